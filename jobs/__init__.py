"""The command-line jobs: each parses its flags and calls the library.

Run as ``python jobs/fit.py``, as ``python -m jobs.fit``, or as the installed console scripts ``rayanom-fit``,
``rayanom-score``, ``rayanom-index``, ``rayanom-decide`` and ``rayanom-compare`` (the package is installed as
``rayanom_jobs``)."""
