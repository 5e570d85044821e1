"""Reports people read (issue #16): figures from :mod:`supportlens.store.daily` turned into a
document (:mod:`supportlens.reports.document`), written as a self-contained HTML page with
charts (:mod:`supportlens.reports.html`) and as Markdown for chat and e-mail
(:mod:`supportlens.reports.markdown`), in English or Chinese.
"""
