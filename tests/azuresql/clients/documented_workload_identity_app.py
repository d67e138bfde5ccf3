# ruff: noqa
# mypy: ignore-errors
# A client written the way Microsoft documents it for AKS workload identity: WorkloadIdentityCredential
# configured entirely by the webhook's environment (AZURE_CLIENT_ID, AZURE_TENANT_ID,
# AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST) and pyodbc with the access-token struct, as in the
# seed's Step 10 (whose printed indentation is broken and whose token path is hard-coded).
import os
import struct

import pyodbc
from azure.identity import WorkloadIdentityCredential

credential = WorkloadIdentityCredential()
connection_string = (
    f"DRIVER={{ODBC Driver 18 for SQL Server}};SERVER={os.environ['AZ_SERVER']};"
    f"DATABASE={os.environ['AZ_DATABASE']};Encrypt=yes;TrustServerCertificate=no;Connection Timeout=30"
)
token_bytes = credential.get_token("https://database.windows.net/.default").token.encode(
    "UTF-16-LE"
)
token_struct = struct.pack(f"<I{len(token_bytes)}s", len(token_bytes), token_bytes)
SQL_COPT_SS_ACCESS_TOKEN = 1256
conn = pyodbc.connect(connection_string, attrs_before={SQL_COPT_SS_ACCESS_TOKEN: token_struct})
cursor = conn.cursor()
cursor.execute("SELECT TOP (1000) * FROM [dbo].[Customer]")
row = cursor.fetchone()
while row:
    print("Customer ID-->" + str(row[0]))
    row = cursor.fetchone()
