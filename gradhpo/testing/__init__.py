"""Toys for tests, benchmarks and experiments: members and objectives that executor workers
(other processes, Ray) can import by name.

* :mod:`~gradhpo.testing.quartic` - :class:`QuarticMember`, a PBT task whose best learning
  rate rises then falls.
* :mod:`~gradhpo.testing.objectives` - tiny study objectives (quick, failing once, slow).
* :mod:`~gradhpo.testing.tasks` - tiny executor tasks (echo, raise, die, report threads)
  for the executor conformance suite.
* :mod:`~gradhpo.testing.regression` - a regression data set and network named by factory
  (``data.factory``, ``model.factory``) with ``training.loss: mse``.
* :mod:`~gradhpo.testing.postgres` - :class:`PostgresServer`, a throwaway PostgreSQL server
  (tests and the study-overhead benchmark).
"""
