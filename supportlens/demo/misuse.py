"""The demo's misuse that fails elsewhere: an integration's payment failures, told the earlier
idempotency-key reuse that caused them instead of "our payment service failed".

Reads ``reports-diagnosed`` and ``misuse-detections`` and compares them with the simulator's
ground truth (:class:`~supportlens.simulator.labels.SequenceMisuseLabel`): every episode's
report must be traced to the detection of its own misusing order.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from sinks.run_summary import newest_diagnoses
from supportlens.config import Settings
from supportlens.contracts import DiagnosedReport, MisuseDetection, decode
from supportlens.demo.incidents import wait_until
from supportlens.demo.story import mark
from supportlens.simulator.labels import RunLabel, SequenceEpisodeLabel
from supportlens.topic_reader import read_range


def trace_problems(episodes: Sequence[SequenceEpisodeLabel], newest: dict[str, DiagnosedReport],
                   rule: str) -> list[str]:
    """How the day's traced reports differ from the ground truth (pure)."""
    problems = []
    for episode in episodes:
        report = newest.get(episode.report_id)
        expected = f"{rule}:{episode.misuse_request_id}"
        if report is None:
            problems.append(f"sequence misuse: report {episode.report_id} was not diagnosed")
        elif report.diagnosis.misuse_detection_id != expected:
            got = report.diagnosis.misuse_detection_id or f"not traced ({report.diagnosis.cls})"
            problems.append(f"sequence misuse: report {episode.report_id} should be traced to {expected}, is {got}")
    return problems


def misuse_of_the_day(settings: Settings, console: Console, runs: Sequence[RunLabel],
                      processes: Sequence[subprocess.Popen[bytes]]) -> list[str]:
    """Print what the integration's users were told, and return how it differs from the truth."""
    labelled = [(run, run.sequence_misuse) for run in runs if run.sequence_misuse is not None]
    episodes = [e for _, truth in labelled for e in truth.episodes]
    if not episodes:
        return []
    truth = labelled[0][1]

    def read() -> dict[str, DiagnosedReport]:
        return newest_diagnoses(decode(m.value(), DiagnosedReport)
                                for m in read_range(settings, [settings.topic("reports-diagnosed")]))

    def all_traced() -> dict[str, DiagnosedReport] | None:
        newest = read()
        return newest if not trace_problems(episodes, newest, truth.rule) else None

    newest = wait_until(console, "waiting for the integration's reports to be traced to its misuse…", all_traced,
                        processes, 60) or read()
    detections = [decode(m.value(), MisuseDetection) for m in read_range(settings, [settings.topic("misuse-detections")])]
    problems = trace_problems(episodes, newest, truth.rule)
    traced = len(episodes) - len(problems)
    console.print(f"\n[bold cyan]misuse that fails elsewhere[/]: account {truth.account_id}'s integration reused an "
                  f"idempotency key with another body {len(episodes)} times in the day; {len(detections)} found in "
                  f"its sequence of requests; {traced} of {len(episodes)} later payment failures its users reported "
                  f"were told the misuse, not \"our payment service failed\" {mark(not problems)}")
    example = next((newest[e.report_id] for e in episodes if e.report_id in newest
                    and newest[e.report_id].diagnosis.misuse_detection_id), None)
    if example is not None:
        d = example.diagnosis
        console.print(f"  report {example.report_id} ({example.locale}) looked like {d.surfaced_as} at {d.service}; "
                      f"told [italic]{escape(example.title)}[/] — {escape(example.action)}")
        console.print(f"  evidence: {escape(d.evidence)}")
    return problems
