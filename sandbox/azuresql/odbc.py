"""Register the Microsoft ODBC Driver 18 from the ``mssql-python-odbc`` wheel with unixODBC.

The seed's client code asks for ``DRIVER={ODBC Driver 18 for SQL Server}``. On a machine where the
driver came from Microsoft's packages that name is in /etc/odbcinst.ini; in the sandbox the driver
comes from a wheel, so the emulator writes an ``odbcinst.ini`` naming the wheel's shared library
and exports ``ODBCSYSINI`` pointing at its folder. unixODBC then resolves the name for any process
that has the sandbox's environment, with no change to the client code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DRIVER_NAME = "ODBC Driver 18 for SQL Server"
# Most specific first: the wheel ships one build per Linux family.
_FAMILIES = ("debian_ubuntu", "rhel", "suse")


class DriverNotFound(Exception):
    """The mssql-python-odbc wheel (or its driver library) is not installed."""


def driver_library() -> Path:
    """The ``libmsodbcsql-18.*.so`` inside the installed mssql-python-odbc wheel."""
    spec = importlib.util.find_spec("mssql_python_odbc")
    if spec is None or not spec.origin:
        raise DriverNotFound(
            "the ODBC Driver 18 wheel is not installed: pip install 'mssql-python-odbc>=18.6,<19'"
        )
    libs = Path(spec.origin).parent / "libs" / "linux"
    for family in _FAMILIES:
        found = sorted((libs / family).glob("*/lib/libmsodbcsql-18.*.so*"))
        if found:
            return found[-1]
    raise DriverNotFound(f"no libmsodbcsql-18 shared library under {libs}")


def write_odbcinst(directory: Path, library: Path | None = None) -> Path:
    """Write ``directory/odbcinst.ini`` (and an empty odbc.ini) registering the driver.

    Returns the ini path; point ``ODBCSYSINI`` at ``directory`` to use it.
    """
    library = library or driver_library()
    directory.mkdir(parents=True, exist_ok=True)
    ini = directory / "odbcinst.ini"
    ini.write_text(
        f"[{DRIVER_NAME}]\n"
        f"Description=Microsoft ODBC Driver 18 for SQL Server (from the mssql-python-odbc wheel)\n"
        f"Driver={library}\n"
        "UsageCount=1\n"
    )
    (directory / "odbc.ini").touch()
    return ini
