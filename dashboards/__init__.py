"""Grafana dashboards as code: one builder function per panel (``problem_trends``, ``surges``,
``incidents``, ``pipeline``), shared defaults in ``common``, JSON written by ``build`` and
pushed to Grafana by ``provision``."""
