"""The jobs the command line runs, each prepare -> run -> summary.

* :mod:`~gradhpo.jobs.train` - one model (``gradhpo train``).
* :mod:`~gradhpo.jobs.tune` - a study (``gradhpo tune`` / ``resume``).
* :mod:`~gradhpo.jobs.pbt` - a population (``gradhpo pbt`` / ``resume``).
* :mod:`~gradhpo.jobs.worker` - one more driver of a running study (``gradhpo worker``).
* :mod:`~gradhpo.jobs.export` - the best model as a plain state_dict + card (``gradhpo export``).
* :mod:`~gradhpo.jobs.rundir` - the run-directory layout and its kind marker.
"""
