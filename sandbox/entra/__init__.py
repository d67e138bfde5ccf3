"""The Entra ID emulator: Entra's token service, Microsoft Graph and ARM managed identities.

The sandbox's stand-in for the Azure control planes the operator talks to, reached over HTTPS
with the real SDKs (azure-identity, msgraph-sdk, azure-mgmt-msi). Layout, one concern per module:

- ``state``: the directory (tenants, apps, managed identities, federated credentials), seeded from
  ``sandbox/world.yaml`` and optionally snapshotted;
- ``tokens``: the emulator's signing key, access tokens it issues and their verification;
- ``oidc``: fetching external issuers' discovery documents and keys (client assertions);
- ``login``: the token endpoint and tenant/instance discovery;
- ``graph``, ``arm``: the Graph v1.0 and ARM surfaces;
- ``faults``: latency, injected failures, propagation delay, clock skew, request log;
- ``routing``: host-based surface selection and named routes; ``admin``: the ``/_sandbox`` API;
- ``server``: wiring and the service contract; ``ctl``: the admin CLI.

docs/entra-emulator.md describes the wire contract for users of the emulator.
"""
