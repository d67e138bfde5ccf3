"""The sandbox's Azure SQL endpoint emulator: TDS with TLS, Entra token logins, T-SQL over SQLite.

Layers, outside in: ``__main__`` (service contract and ``ctl``), ``admin`` (test controls over
HTTP), ``server`` (listeners and TDS sessions), ``tls`` (TLS inside PRELOGIN and TDS 8.0),
``tds`` (the wire format), ``login`` (token checks), ``engine`` (sessions and databases: T-SQL,
catalog and security over SQLite) with ``statements`` (batch splitting), ``sqltypes`` (type
mapping) and ``results`` (events and SQL errors), ``directory`` (Graph lookups for CREATE USER),
``config`` (the world's ``sql:`` section) and ``odbc`` (registering the wheel's ODBC driver).
"""
