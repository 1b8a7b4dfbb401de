"""Toys for tests, benchmarks and experiments: members and objectives that executor workers
(other processes, Ray) can import by name.

* :mod:`~gradhpo.testing.quartic` - :class:`QuarticMember`, a PBT task whose best learning
  rate rises then falls.
* :mod:`~gradhpo.testing.objectives` - tiny study objectives (quick, failing once, slow).
* :mod:`~gradhpo.testing.postgres` - :class:`PostgresServer`, a throwaway PostgreSQL server
  (tests and the study-overhead benchmark).
"""
