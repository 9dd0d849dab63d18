"""Every error geminikv returns to a client, with etcd's gRPC code and message.

Clients (kube-apiserver included) recognise etcd errors by their message text, so the
messages are etcd's exactly (api/v3rpc/rpctypes/error.go). Each error is one declaration
with its message, and its gRPC code unless the group it belongs to gives it.
"""

from __future__ import annotations

import grpc


class EtcdError(Exception):
    """An error with a fixed gRPC status code and message, declared as class keywords:
    ``class Name(Group, message="..."): ...`` (a group: ``class Group(EtcdError, code=...)``)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    message: str = "etcdserver: unknown error"

    def __init_subclass__(
        cls, code: grpc.StatusCode | None = None, message: str | None = None
    ) -> None:
        super().__init_subclass__()
        if code is not None:
            cls.code = code
        if message is not None:
            cls.message = message

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.message = message
        super().__init__(self.message)


class InvalidArgument(EtcdError, code=grpc.StatusCode.INVALID_ARGUMENT): ...


class EmptyKey(InvalidArgument, message="etcdserver: key is not provided"): ...


class KeyNotFound(InvalidArgument, message="etcdserver: key not found"): ...


class ValueProvided(InvalidArgument, message="etcdserver: value is provided"): ...


class LeaseProvided(InvalidArgument, message="etcdserver: lease is provided"): ...


class TooManyOps(InvalidArgument, message="etcdserver: too many operations in txn request"): ...


class DuplicateKey(InvalidArgument, message="etcdserver: duplicate key given in txn request"): ...


class RequestTooLarge(InvalidArgument, message="etcdserver: request is too large"): ...


class InvalidSortOption(InvalidArgument, message="etcdserver: invalid sort option"):
    """etcd 3.6 rejects unknown sort enums; 3.4 and 3.5 crash on an unknown sort target."""


class OutOfRange(EtcdError, code=grpc.StatusCode.OUT_OF_RANGE): ...


class Compacted(OutOfRange, message="etcdserver: mvcc: required revision has been compacted"): ...


class FutureRevision(
    OutOfRange, message="etcdserver: mvcc: required revision is a future revision"
): ...


class LeaseTTLTooLarge(OutOfRange, message="etcdserver: too large lease TTL"): ...


class LeaseNotFound(
    EtcdError, code=grpc.StatusCode.NOT_FOUND, message="etcdserver: requested lease not found"
): ...


class LeaseExists(
    EtcdError, code=grpc.StatusCode.FAILED_PRECONDITION, message="etcdserver: lease already exists"
): ...


class Unavailable(
    EtcdError, code=grpc.StatusCode.UNAVAILABLE, message="etcdserver: request timed out"
): ...


class NoSpace(
    EtcdError,
    code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    message="etcdserver: mvcc: database space exceeded",
): ...


class Corrupt(EtcdError, code=grpc.StatusCode.DATA_LOSS, message="etcdserver: corrupt cluster"): ...


class ServerStopped(Unavailable, message="etcdserver: server stopped"): ...


class Membership(EtcdError, code=grpc.StatusCode.FAILED_PRECONDITION): ...


class MemberNotFound(
    EtcdError, code=grpc.StatusCode.NOT_FOUND, message="etcdserver: member not found"
): ...


class MemberNotLearner(Membership, message="etcdserver: can only promote a learner member"): ...


class BadLeaderTransferee(Membership, message="etcdserver: bad leader transferee"): ...


class MembersAreProcesses(
    Membership,
    message="geminikv: every geminikv process serving the database is a member; start or "
    "stop a process instead of changing membership",
): ...


class WrongDowngradeVersionFormat(
    InvalidArgument, message="etcdserver: wrong downgrade target version format"
): ...


class NoInflightDowngrade(Membership, message="etcdserver: no inflight downgrade job"): ...


class DowngradeDoesNotApply(
    Membership,
    message="geminikv: downgrade does not apply; the etcd version geminikv reports is "
    "--emulated-etcd-version",
): ...


class Rewound(
    Unavailable, message="geminikv: the database revision went backwards; rebuilding the index"
):
    """PostgreSQL's newest revision went below one already served (a restore from an
    older backup, a failover to a lagging replica): geminikv rebuilds its index."""


# Rewound's message when the rebuild is because this process fell behind compaction.
BEHIND_COMPACTION = "geminikv: this process fell behind compaction; rebuilding the index"


# -- auth (etcd's server/auth/store.go errors as api/v3rpc/rpctypes maps them, etcd 3.5) ------


class FailedPrecondition(EtcdError, code=grpc.StatusCode.FAILED_PRECONDITION): ...


class RootUserNotExist(FailedPrecondition, message="etcdserver: root user does not exist"): ...


class RootRoleNotExist(
    FailedPrecondition, message="etcdserver: root user does not have root role"
): ...


class UserAlreadyExist(FailedPrecondition, message="etcdserver: user name already exists"): ...


class UserEmpty(InvalidArgument, message="etcdserver: user name is empty"): ...


class UserNotFound(FailedPrecondition, message="etcdserver: user name not found"): ...


class RoleAlreadyExist(FailedPrecondition, message="etcdserver: role name already exists"): ...


class RoleNotFound(FailedPrecondition, message="etcdserver: role name not found"): ...


class RoleEmpty(InvalidArgument, message="etcdserver: role name is empty"): ...


class AuthFailed(
    InvalidArgument, message="etcdserver: authentication failed, invalid user ID or password"
): ...


class PermissionNotGiven(InvalidArgument, message="etcdserver: permission not given"): ...


class PermissionDenied(
    EtcdError, code=grpc.StatusCode.PERMISSION_DENIED, message="etcdserver: permission denied"
): ...


class RoleNotGranted(FailedPrecondition, message="etcdserver: role is not granted to the user"): ...


class PermissionNotGranted(
    FailedPrecondition, message="etcdserver: permission is not granted to the role"
): ...


class AuthNotEnabled(FailedPrecondition, message="etcdserver: authentication is not enabled"): ...


class InvalidAuthToken(
    EtcdError, code=grpc.StatusCode.UNAUTHENTICATED, message="etcdserver: invalid auth token"
): ...


class InvalidAuthMgmt(InvalidArgument, message="etcdserver: invalid auth management"): ...


class AuthOldRevision(InvalidArgument, message="etcdserver: revision of auth store is old"):
    """A JWT token issued before the latest auth change: etcd's clients log in again."""


class NoPasswordUser(
    EtcdError, message="auth: authentication failed, password was given for no password user"
):
    """etcd maps no gRPC error to it: Unknown with the auth package's own text."""


class PasswordTooLong(EtcdError, message="bcrypt: password length exceeds 72 bytes"):
    """Go's bcrypt refuses longer passwords (etcd passes its error on as Unknown)."""


class VerifyOnly(EtcdError, message="auth: token signing attempted with verify-only key"):
    """--auth-token jwt with a public key alone: tokens are checked, none are issued."""


# The auth package's own texts (server/auth/store.go), which etcd's Maintenance Defragment,
# Hash, HashKV and Snapshot return unconverted, as gRPC's Unknown.
AUTH_PACKAGE_MESSAGES: dict[type[EtcdError], str] = {
    UserEmpty: "auth: user name is empty",
    UserNotFound: "auth: user not found",
    PermissionDenied: "auth: permission denied",
    InvalidAuthToken: "auth: invalid auth token",
}


def go_status_text(err: EtcdError) -> str:
    """A gRPC status as Go's ``status.Error(...).Error()`` prints it: etcd puts this text in
    a watch's cancel_reason when auth refuses the watch."""
    words = err.code.name.split("_")
    return f"rpc error: code = {''.join(w.capitalize() for w in words)} desc = {err.message}"


# -- messages that are not raised as errors ------------------------------------------------

# A watch's cancel_reason (etcd's mvcc errors, in WatchResponse.cancel_reason).
WATCH_EMPTY_RANGE = "mvcc: watcher range is empty"
WATCH_DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"

# Requests that could not be read, with Go gRPC's texts as etcd returns them (INTERNAL):
# a unary request, and a message of a request stream (``{}``: the decoder's complaint).
UNDECODABLE_REQUEST = "grpc: error unmarshalling request: {}"
UNDECODABLE_STREAM_MESSAGE = "grpc: failed to unmarshal the received message: {}"

# Methods geminikv does not serve (UNIMPLEMENTED); ``{}``: Service.Method.
NOT_IMPLEMENTED = "geminikv: {} is not implemented"


# -- `geminikv load-snapshot`: why a snapshot is refused (nothing is written) --------------

LOAD_NOT_EMPTY = (
    "the database is not empty (newest revision {revision}, {leases} leases): an etcd "
    "snapshot loads only into a new database"
)
LOAD_NO_TRAILER = (
    "{path}: no sha256 trailer (size {size} bytes): not a file `etcdctl snapshot save` "
    "wrote, or a truncated one; a database file copied from etcd's data directory "
    "needs --skip-hash-check"
)
LOAD_HASH_MISMATCH = (
    "{path}: corrupt snapshot: the sha256 of its {size} bytes does not match the trailer"
)
LOAD_NOT_BBOLT = "{path}: not an etcd snapshot: no bbolt database (no valid meta page: {why})"
LOAD_NOT_ETCD = "{path}: not an etcd snapshot: the bbolt database has no {bucket!r} bucket"
LOAD_CORRUPT = "{path}: corrupt snapshot: {why}"
LOAD_NO_FREE_REVISION = (
    "no revision without a key to hold Kine's compact_rev_key row (revisions 1 to "
    "{revision} each changed a key)"
)
LOAD_ETCD_UNREACHABLE = "cannot take a snapshot from etcd at {endpoint}: {why}"
