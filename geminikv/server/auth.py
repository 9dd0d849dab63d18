"""etcdserverpb.Auth, and the guard the other services call while auth is enabled: who a
request comes from (the ``token`` metadata, else the TLS client certificate's common name
with --client-cert-auth) and whether the rules of geminikv/auth allow it."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from geminikv import errors
from geminikv.auth import requests
from geminikv.auth.store import AuthStore
from geminikv.auth.tokens import AuthInfo
from geminikv.mvcc import txn
from geminikv.proto.authpb import auth_pb2
from geminikv.proto.etcdserverpb import rpc_pb2 as pb
from geminikv.proto.etcdserverpb import rpc_pb2_grpc
from geminikv.server.rpc import Identity, Response, answer, etcd_errors

# etcd's metadata keys for the token (rpctypes.TokenFieldNameGRPC, TokenFieldNameSwagger)
TOKEN_KEYS = ("token", "authorization")
# etcd's gateway marks what it forwards: its certificate's common name is nobody's
GATEWAY_KEY = "grpcgateway-accept"


class Guard:
    """The checks of each request kind; call them only while ``enabled``."""

    def __init__(
        self, store: AuthStore, lease_keys: requests.LeaseKeys, client_cert_auth: bool
    ) -> None:
        self.store = store
        self.lease_keys = lease_keys
        self.client_cert_auth = client_cert_auth

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    async def info(self, context: grpc.aio.ServicerContext) -> AuthInfo | None:
        """etcd's AuthInfoFromCtx, then AuthInfoFromTLS."""
        if not self.store.enabled:
            return None
        metadata = dict(reversed(context.invocation_metadata() or ()))  # the first of each
        token = next((metadata[k] for k in TOKEN_KEYS if k in metadata), None)
        if token is not None:
            return await self.store.info_from_token(str(token).removeprefix("Bearer "))
        if self.client_cert_auth and GATEWAY_KEY not in metadata:
            names = (context.auth_context() or {}).get("x509_common_name")
            if names:
                return AuthInfo(names[0].decode(), self.store.revision)
        return None

    async def require_info(self, context: grpc.aio.ServicerContext) -> AuthInfo | None:
        """etcd's requireAuthInfo: any user at all."""
        info = await self.info(context)
        if self.store.enabled and info is None:
            raise errors.UserEmpty()
        return info

    async def admin(self, context: grpc.aio.ServicerContext) -> AuthInfo | None:
        info = await self.info(context)
        self.store.check_admin(info)
        return info

    # -- KV: etcd checks a request (v3rpc), then its token, then its size, then the
    # permissions. The mvcc store checks every request anyway, so here a request is
    # checked only when it is refused, for the error etcd would give first.

    async def range(self, req: pb.RangeRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            requests.check_range(self.store, await self.info(context), req)
        except errors.EtcdError:
            txn.check_range(req)
            raise

    async def key_get(self, key: bytes, context: grpc.aio.ServicerContext) -> None:
        self.store.check_op(await self.info(context), key, b"", write=False)

    async def put(self, req: pb.PutRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            requests.check_put(self.store, await self.info(context), req, self.lease_keys)
        except errors.EtcdError as err:
            txn.check_put(req)
            _check_size(req, err)
            raise

    async def delete_range(
        self, req: pb.DeleteRangeRequest, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            requests.check_delete(self.store, await self.info(context), req)
        except errors.EtcdError as err:
            txn.check_delete(req)
            _check_size(req, err)
            raise

    async def txn(self, req: pb.TxnRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            requests.check_txn(self.store, await self.info(context), req, self.lease_keys)
        except errors.EtcdError as err:
            txn.check_txn(req)
            txn.check_branch(req.success)
            txn.check_branch(req.failure)
            _check_size(req, err)
            raise

    async def guarded_put(
        self, key: bytes, lease: int, read_on_failure: bool, context: grpc.aio.ServicerContext
    ) -> None:
        info = await self.info(context)
        requests.check_guarded_put(self.store, info, key, lease, read_on_failure, self.lease_keys)

    # -- Watch and Lease -------------------------------------------------------------------

    async def watch_refusal(
        self, req: pb.WatchCreateRequest, context: grpc.aio.ServicerContext
    ) -> str | None:
        """The cancel reason etcd gives a watch the user may not read, or None."""
        try:
            key, end = requests.watch_range(req.key, req.range_end)
            self.store.check_op(await self.info(context), key, end, write=False)
        except (errors.InvalidAuthToken, errors.AuthOldRevision, errors.UserEmpty) as err:
            return errors.go_status_text(err)
        except errors.EtcdError:
            return errors.go_status_text(errors.PermissionDenied())
        return None

    async def lease_writes(self, lease: int, context: grpc.aio.ServicerContext) -> None:
        """LeaseRevoke and each LeaseKeepAlive: write permission on the lease's keys."""
        info = await self.require_info(context)
        requests.check_lease_writes(self.store, info, lease, self.lease_keys)

    async def lease_reads(self, leases: Iterable[int], context: grpc.aio.ServicerContext) -> None:
        """LeaseTimeToLive with keys and LeaseLeases: read permission on the leases' keys."""
        info = await self.require_info(context)
        requests.check_lease_reads(self.store, info, leases, self.lease_keys)


def _check_size(
    req: pb.PutRequest | pb.DeleteRangeRequest | pb.TxnRequest, refusal: Exception
) -> None:
    """etcd refuses a request too large after its token and before its permissions."""
    if not isinstance(refusal, errors.InvalidAuthToken):
        txn.check_size(req)


# -- Maintenance and Cluster: checked at registration (server/registration.py) --------------

ADMIN, ANY_USER = "admin", "any user"
# etcd returns these methods' auth errors unconverted (Unknown, the auth package's text)
UNCONVERTED = frozenset(
    f"/etcdserverpb.Maintenance/{m}" for m in ("Defragment", "Snapshot", "Hash", "HashKV")
)
# etcd's authMaintenanceServer and AuthAdmin; Alarm is ANY_USER for GET (see _alarm_rule)
METHOD_RULES: dict[str, str] = {
    **{
        f"/etcdserverpb.Maintenance/{m}": ADMIN
        for m in ("Defragment", "Snapshot", "Hash", "HashKV", "MoveLeader", "Downgrade")
    },
    "/etcdserverpb.Maintenance/Status": ANY_USER,
    "/etcdserverpb.Maintenance/Alarm": ADMIN,
    **{
        f"/etcdserverpb.Cluster/{m}": ADMIN
        for m in ("MemberAdd", "MemberRemove", "MemberUpdate", "MemberPromote")
    },
}


def guarded(guard: Guard) -> Callable[[str, Any], Any]:
    """A function that wraps a method's handler with its rule in METHOD_RULES."""

    async def check(name: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        rule = METHOD_RULES[name]
        if rule == ADMIN and name.endswith("/Alarm") and request.action == pb.AlarmRequest.GET:
            rule = ANY_USER
        try:
            if rule == ADMIN:
                await guard.admin(context)
            else:
                await guard.require_info(context)
        except errors.EtcdError as err:
            if name in UNCONVERTED:
                text = errors.AUTH_PACKAGE_MESSAGES.get(type(err), err.message)
                await context.abort(grpc.StatusCode.UNKNOWN, text)
            await context.abort(err.code, err.message)

    def wrap(name: str, handler: Any) -> Any:
        if name not in METHOD_RULES:
            return handler
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            @functools.wraps(behaviour)
            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if guard.enabled:
                    await check(name, request, context)
                return await behaviour(request, context)

            return handler._replace(unary_unary=unary)
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if guard.enabled:
                    await check(name, request, context)
                async for response in streaming(request, context):
                    yield response

            return handler._replace(unary_stream=stream)
        return handler

    return wrap


# -- the Auth service -----------------------------------------------------------------------


class AuthService(rpc_pb2_grpc.AuthServicer):
    def __init__(self, guard: Guard, identity: Identity, revision: Callable[[], int]) -> None:
        self.guard = guard
        self.store = guard.store
        self.identity = identity
        self.revision = revision  # the KV store's, for response headers

    def _answer(self, resp: Response) -> Response:
        return answer(self.identity, resp, self.revision())

    @etcd_errors
    async def AuthEnable(
        self, request: pb.AuthEnableRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthEnableResponse:
        await self.guard.admin(context)
        await self.store.auth_enable()
        return self._answer(pb.AuthEnableResponse())

    @etcd_errors
    async def AuthDisable(
        self, request: pb.AuthDisableRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthDisableResponse:
        await self.guard.admin(context)
        await self.store.auth_disable()
        return self._answer(pb.AuthDisableResponse())

    @etcd_errors
    async def AuthStatus(
        self, request: pb.AuthStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthStatusResponse:
        await self.guard.admin(context)
        await self.store.refresh()
        return self._answer(
            pb.AuthStatusResponse(enabled=self.store.enabled, authRevision=self.store.revision)
        )

    @etcd_errors
    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthenticateResponse:
        token = await self.store.authenticate(request.name, request.password)
        return self._answer(pb.AuthenticateResponse(token=token))

    @etcd_errors
    async def UserAdd(
        self, request: pb.AuthUserAddRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserAddResponse:
        await self.guard.admin(context)
        no_password = request.HasField("options") and request.options.no_password
        await self.store.user_add(request.name, request.password, no_password)
        return self._answer(pb.AuthUserAddResponse())

    @etcd_errors
    async def UserGet(
        self, request: pb.AuthUserGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserGetResponse:
        info = await self.guard.info(context)
        if (info.user if info else "") != request.name:
            self.store.check_admin(info)  # a user may read itself
        await self.store.refresh()
        return self._answer(pb.AuthUserGetResponse(roles=self.store.user_get(request.name)))

    @etcd_errors
    async def UserList(
        self, request: pb.AuthUserListRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserListResponse:
        await self.guard.admin(context)
        await self.store.refresh()
        return self._answer(pb.AuthUserListResponse(users=self.store.user_list()))

    @etcd_errors
    async def UserDelete(
        self, request: pb.AuthUserDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserDeleteResponse:
        await self.guard.admin(context)
        await self.store.user_delete(request.name)
        return self._answer(pb.AuthUserDeleteResponse())

    @etcd_errors
    async def UserChangePassword(
        self, request: pb.AuthUserChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserChangePasswordResponse:
        await self.guard.admin(context)
        await self.store.user_change_password(
            request.name, request.password, request.hashedPassword
        )
        return self._answer(pb.AuthUserChangePasswordResponse())

    @etcd_errors
    async def UserGrantRole(
        self, request: pb.AuthUserGrantRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserGrantRoleResponse:
        await self.guard.admin(context)
        await self.store.user_grant_role(request.user, request.role)
        return self._answer(pb.AuthUserGrantRoleResponse())

    @etcd_errors
    async def UserRevokeRole(
        self, request: pb.AuthUserRevokeRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthUserRevokeRoleResponse:
        await self.guard.admin(context)
        await self.store.user_revoke_role(request.name, request.role)
        return self._answer(pb.AuthUserRevokeRoleResponse())

    @etcd_errors
    async def RoleAdd(
        self, request: pb.AuthRoleAddRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthRoleAddResponse:
        await self.guard.admin(context)
        await self.store.role_add(request.name)
        return self._answer(pb.AuthRoleAddResponse())

    @etcd_errors
    async def RoleGet(
        self, request: pb.AuthRoleGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthRoleGetResponse:
        info = await self.guard.info(context)
        if not self.store.is_admin(info):
            user = self.store.users.get(info.user.encode()) if info else None
            if user is None or request.role.encode() not in user.roles:
                self.store.check_admin(info)  # a user may read its own roles
        await self.store.refresh()
        perms = [
            auth_pb2.Permission(permType=p.perm_type, key=p.key, range_end=p.range_end)  # type: ignore[arg-type]
            for p in self.store.role_get(request.role)
        ]
        return self._answer(pb.AuthRoleGetResponse(perm=perms))

    @etcd_errors
    async def RoleList(
        self, request: pb.AuthRoleListRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthRoleListResponse:
        await self.guard.admin(context)
        await self.store.refresh()
        return self._answer(pb.AuthRoleListResponse(roles=self.store.role_list()))

    @etcd_errors
    async def RoleDelete(
        self, request: pb.AuthRoleDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthRoleDeleteResponse:
        await self.guard.admin(context)
        await self.store.role_delete(request.role)
        return self._answer(pb.AuthRoleDeleteResponse())

    @etcd_errors
    async def RoleGrantPermission(
        self, request: pb.AuthRoleGrantPermissionRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthRoleGrantPermissionResponse:
        await self.guard.admin(context)
        if not request.HasField("perm"):
            raise errors.PermissionNotGiven()
        perm = request.perm
        await self.store.role_grant_permission(
            request.name, perm.key, perm.range_end, perm.permType
        )
        return self._answer(pb.AuthRoleGrantPermissionResponse())

    @etcd_errors
    async def RoleRevokePermission(
        self, request: pb.AuthRoleRevokePermissionRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthRoleRevokePermissionResponse:
        await self.guard.admin(context)
        await self.store.role_revoke_permission(request.role, request.key, request.range_end)
        return self._answer(pb.AuthRoleRevokePermissionResponse())
