#!/bin/sh
# write-odbcinst.sh VENV OUT: write to OUT an odbcinst.ini that registers the Microsoft ODBC
# Driver 18 of the mssql-python-odbc wheel installed in the virtualenv VENV under its usual name,
# "ODBC Driver 18 for SQL Server", so that connection strings need no path. Both Dockerfiles run
# it in their build stage and copy OUT to /etc/odbcinst.ini; the build fails here, not at run
# time, if the wheel's layout ever changes.
set -eu
venv=$1
out=$2
arch=$(uname -m)
set -- "$venv"/lib/python3*/site-packages/mssql_python_odbc/libs/linux/debian_ubuntu/"$arch"/lib/libmsodbcsql-18.*.so*
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
    echo "error: expected one libmsodbcsql-18 for debian_ubuntu/$arch in the mssql-python-odbc wheel under $venv, found: $*" >&2
    exit 1
fi
printf '[ODBC Driver 18 for SQL Server]\nDescription=Microsoft ODBC Driver 18 for SQL Server (mssql-python-odbc wheel)\nDriver=%s\nUsageCount=1\n' "$1" >"$out"
