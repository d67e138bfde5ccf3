"""sql-workload-identity-operator: a SqlWorkloadIdentity resource reconciled into Entra federation.

Where things are (the layout is the architecture):

* ``handlers``: the only module that imports kopf. Thin wiring: settings, start-up and clean-up
  of the shared clients, the create/update/resume/delete handlers, all calling ``pipeline``.
* ``pipeline``: runs the reconcile steps in order and turns their outcomes into status
  conditions and Kubernetes Events; also the finalizer's clean-up and the fleet-wide drift loop.
* ``steps``: one module per condition (``FederatedCredentialReady``, ``ServiceAccountReady``,
  ``WorkloadsReady``): plain typed functions over narrow client interfaces.
* ``cloud``: the Entra side behind one interface, ``CredentialStore``, with a Graph
  implementation (app registrations) and an ARM one (user-assigned managed identities).
* ``kube``: the Kubernetes side behind ``KubeClient``.
* ``errors``: every failure mapped to retry-or-stop and to a condition reason, in one place.
* ``spec``, ``naming``, ``conditions``, ``config``: pure logic, no I/O.

Domain modules never import kopf, so they are testable with the fakes in tests/operator/unit.
"""

from importlib import metadata as _metadata

DISTRIBUTION = "sql-workload-identity-operator"


def version() -> str:
    """The installed package's version (pyproject.toml's), for ``--version`` and the metrics."""
    try:
        return _metadata.version(DISTRIBUTION)
    except _metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
