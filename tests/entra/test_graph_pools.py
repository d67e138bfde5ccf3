"""What identity pools need from Graph, through msgraph-sdk: apps registered by the operator,
their service principals, and security groups whose members share database access.

The operator holds ``Application.ReadWrite.OwnedBy`` and ``Group.Create`` (sandbox/world.yaml):
Graph makes it the owner of the apps it registers, and it names itself owner of the groups it
creates, which lets it change their members without ``GroupMember.ReadWrite.All``.
"""

from __future__ import annotations

import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ClientSecretCredential
from entra_harness import EntraService, GraphFactory
from msgraph.generated.models.application import Application
from msgraph.generated.models.federated_identity_credential import FederatedIdentityCredential
from msgraph.generated.models.group import Group
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.reference_create import ReferenceCreate
from msgraph.generated.models.service_principal import ServicePrincipal

OPERATOR = "sql-workload-identity-operator"  # Application.ReadWrite.OwnedBy, Group.Create
NO_ROLES = "SP-AZURESQL-USER"  # a client secret and no Graph permission
ADMIN = "sandbox-admin"  # Application.ReadWrite.All, Group.ReadWrite.All
SQL_SERVER = "sandbox-sql-server"  # Application.Read.All, GroupMember.Read.All
GRAPH = "https://graph.microsoft.com/v1.0"


def _ref(object_id: str) -> ReferenceCreate:
    return ReferenceCreate(odata_id=f"{GRAPH}/directoryObjects/{object_id}")


def _security_group(name: str, owner: str | None = None) -> Group:
    group = Group(display_name=name, mail_enabled=False, mail_nickname=name, security_enabled=True)
    if owner is not None:
        group.additional_data = {"owners@odata.bind": [f"{GRAPH}/servicePrincipals/{owner}"]}
    return group


def _denied(error: ODataError, status: int = 403, code: str = "Authorization_RequestDenied") -> str:
    assert error.response_status_code == status
    assert error.error is not None and error.error.code == code
    return error.error.message or ""


def _sign_in(entra: EntraService, client_id: str) -> None:
    credential = ClientSecretCredential(
        entra.tenant_id,
        client_id,
        "not-its-secret",
        authority=entra.url,
        disable_instance_discovery=True,
        connection_verify=str(entra.ca),
    )
    credential.get_token("https://graph.microsoft.com/.default")


async def test_operator_registers_an_app_and_its_service_principal_and_owns_both(
    entra: EntraService, graph_as: GraphFactory
) -> None:
    graph = graph_as(OPERATOR)
    app = await graph.applications.post(Application(display_name="pool-member-1"))
    assert app is not None and app.id and app.app_id and app.display_name == "pool-member-1"

    # Until its service principal exists the app cannot sign in (Entra's AADSTS7000229).
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000229"):
        _sign_in(entra, app.app_id)

    sp = await graph.service_principals.post(ServicePrincipal(app_id=app.app_id))
    assert sp is not None and sp.id and sp.app_id == app.app_id
    # Now it is known: the same wrong secret fails on the secret, not the principal.
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        _sign_in(entra, app.app_id)

    # Owner: the operator may write its federated credentials (Application.ReadWrite.OwnedBy).
    created = await graph.applications.by_application_id(
        app.id
    ).federated_identity_credentials.post(
        FederatedIdentityCredential(
            name="ns-a",
            issuer="https://issuer.example/cluster-a",
            subject="system:serviceaccount:a:sa",
            audiences=["api://AzureADTokenExchange"],
        )
    )
    assert created is not None and created.name == "ns-a"
    found = await graph.service_principals.by_service_principal_id(sp.id).get()
    assert found is not None and found.app_id == app.app_id

    with pytest.raises(ODataError) as again:
        await graph.service_principals.post(ServicePrincipal(app_id=app.app_id))
    assert "is already in use" in _denied(
        again.value, 409, "Request_MultipleObjectsWithSameKeyValue"
    )

    # Deleting the app takes its service principal with it (and out of its groups).
    operator_sp = entra.principal(OPERATOR).sp_object_id
    group = await graph.groups.post(_security_group("pool", owner=operator_sp))
    assert group is not None and group.id
    await graph.groups.by_group_id(group.id).members.ref.post(_ref(sp.id))
    payroll = entra.principal("payroll-app").app_object_id or ""
    with pytest.raises(ODataError) as not_owner:
        await graph.applications.by_application_id(payroll).delete()
    _denied(not_owner.value)
    await graph.applications.by_application_id(app.id).delete()
    with pytest.raises(ODataError) as deleted:
        await graph.service_principals.by_service_principal_id(sp.id).get()
    _denied(deleted.value, 404, "Request_ResourceNotFound")
    members = await graph_as(ADMIN).groups.by_group_id(group.id).members.get()
    assert members is not None and members.value == []
    with pytest.raises(ClientAuthenticationError, match="AADSTS700016"):
        _sign_in(entra, app.app_id)


async def test_registering_apps_needs_a_permission_and_ownership(
    entra: EntraService, graph_as: GraphFactory
) -> None:
    with pytest.raises(ODataError) as no_role:
        await graph_as(NO_ROLES).applications.post(Application(display_name="nope"))
    assert _denied(no_role.value) == "Insufficient privileges to complete the operation."

    # An OwnedBy caller may create a service principal only for an app it owns.
    unowned = await graph_as(ADMIN).applications.post(Application(display_name="admins-app"))
    assert unowned is not None and unowned.app_id
    with pytest.raises(ODataError) as not_owner:
        await graph_as(OPERATOR).service_principals.post(ServicePrincipal(app_id=unowned.app_id))
    _denied(not_owner.value)
    with pytest.raises(ODataError) as unknown:
        await graph_as(OPERATOR).service_principals.post(
            ServicePrincipal(app_id="00000000-0000-0000-0000-00000000dead")
        )
    _denied(unknown.value, 400, "Request_BadRequest")


async def test_group_membership_lifecycle(entra: EntraService, graph_as: GraphFactory) -> None:
    operator_sp = entra.principal(OPERATOR).sp_object_id
    member = entra.principal("customer-api").sp_object_id
    identity = entra.principal("customer-api-identity").sp_object_id
    graph = graph_as(OPERATOR)
    group = await graph.groups.post(_security_group("pool-readers", owner=operator_sp))
    assert group is not None and group.id and group.security_enabled and not group.mail_enabled

    members = graph.groups.by_group_id(group.id).members
    await members.ref.post(_ref(member))
    await members.ref.post(_ref(identity))  # a managed identity is a service principal too
    with pytest.raises(ODataError) as duplicate:
        await members.ref.post(_ref(member))
    assert _denied(duplicate.value, 400, "Request_BadRequest") == (
        "One or more added object references already exist for the following modified "
        "properties: 'members'."
    )
    fetched = await graph.groups.by_group_id(group.id).get()  # an owner may read its group
    assert fetched is not None and fetched.display_name == "pool-readers"

    # Listing members needs a read permission even for the owner; the admin has one.
    with pytest.raises(ODataError) as owner_list:
        await members.get()
    _denied(owner_list.value)
    listed = await graph_as(ADMIN).groups.by_group_id(group.id).members.get()
    assert listed is not None
    assert sorted(m.id or "" for m in listed.value or []) == sorted([member, identity])
    assert {type(m).__name__ for m in listed.value or []} == {"ServicePrincipal"}

    # What the SQL server's identity asks when a member logs in.
    reader = graph_as(SQL_SERVER)
    groups = await reader.service_principals.by_service_principal_id(member).member_of.get()
    assert groups is not None and [g.id for g in groups.value or []] == [group.id]

    await members.by_directory_object_id(member).ref.delete()
    with pytest.raises(ODataError) as gone:
        await members.by_directory_object_id(member).ref.delete()
    _denied(gone.value, 404, "Request_ResourceNotFound")
    groups = await reader.service_principals.by_service_principal_id(member).member_of.get()
    assert groups is not None and groups.value == []


async def test_transitive_member_of_follows_nested_groups(
    entra: EntraService, graph_as: GraphFactory
) -> None:
    admin = graph_as(ADMIN)
    outer = await admin.groups.post(_security_group("outer"))
    inner = await admin.groups.post(_security_group("inner"))
    assert outer is not None and outer.id and inner is not None and inner.id
    member = entra.principal("customer-api").sp_object_id
    await admin.groups.by_group_id(outer.id).members.ref.post(_ref(inner.id))
    await admin.groups.by_group_id(inner.id).members.ref.post(_ref(member))
    sp = admin.service_principals.by_service_principal_id(member)
    direct = await sp.member_of.get()
    transitive = await sp.transitive_member_of.get()
    assert direct is not None and [g.id for g in direct.value or []] == [inner.id]
    assert transitive is not None
    assert sorted(g.id or "" for g in transitive.value or []) == sorted([inner.id, outer.id])


async def test_groups_refuse_callers_without_permission_or_ownership(
    entra: EntraService, graph_as: GraphFactory
) -> None:
    with pytest.raises(ODataError) as create:
        await graph_as(NO_ROLES).groups.post(_security_group("nope"))
    _denied(create.value)

    group = await graph_as(ADMIN).groups.post(_security_group("admins-group"))
    assert group is not None and group.id
    member = entra.principal("customer-api").sp_object_id
    # Group.Create alone does not let the operator change a group it does not own.
    with pytest.raises(ODataError) as not_owner:
        await graph_as(OPERATOR).groups.by_group_id(group.id).members.ref.post(_ref(member))
    _denied(not_owner.value)
    # Group.Create may name the caller itself in the new group, others only if it may read them.
    payroll = entra.principal("payroll-app").sp_object_id  # not owned by the operator
    stranger = _security_group("with-a-stranger", owner=entra.principal(OPERATOR).sp_object_id)
    stranger.additional_data["members@odata.bind"] = [f"{GRAPH}/servicePrincipals/{payroll}"]
    with pytest.raises(ODataError) as unreadable:
        await graph_as(OPERATOR).groups.post(stranger)
    _denied(unreadable.value)
    owned = _security_group("with-its-own-app", owner=entra.principal(OPERATOR).sp_object_id)
    owned.additional_data["members@odata.bind"] = [f"{GRAPH}/servicePrincipals/{member}"]
    made = await graph_as(OPERATOR).groups.post(owned)  # customer-api is the operator's own
    assert made is not None and made.id
    with pytest.raises(ODataError) as no_read:
        await graph_as(NO_ROLES).service_principals.by_service_principal_id(member).member_of.get()
    _denied(no_read.value)


async def test_group_creation_is_validated(entra: EntraService, graph_as: GraphFactory) -> None:
    graph = graph_as(OPERATOR)
    missing = Group(display_name="no-nick", mail_enabled=False, security_enabled=True)
    with pytest.raises(ODataError) as no_nickname:
        await graph.groups.post(missing)
    assert "mailNickname" in _denied(no_nickname.value, 400, "Request_BadRequest")
    mail = Group(display_name="m", mail_enabled=True, mail_nickname="m", security_enabled=True)
    with pytest.raises(ODataError) as mail_enabled:
        await graph.groups.post(mail)
    _denied(mail_enabled.value, 400, "Request_BadRequest")
    bad_member = _security_group("bad-member")
    bad_member.additional_data = {
        "members@odata.bind": [f"{GRAPH}/directoryObjects/00000000-0000-0000-0000-00000000dead"]
    }
    with pytest.raises(ODataError) as unknown:
        await graph.groups.post(bad_member)
    _denied(unknown.value, 404, "Request_ResourceNotFound")
