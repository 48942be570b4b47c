"""The MongoDB sink, on PyMongo's native asyncio client (``AsyncMongoClient``).

Works with MongoDB (standalone, replica set, sharded, Atlas) and with
MongoDB-compatible services such as Azure Cosmos DB for MongoDB.

* A part is inserted with its deterministic ``_id`` (``insert_one``); a
  security event batch with ``insert_many(ordered=False)``.
* Writes and the duplicate check below ignore the URI's write concern, read
  preference and read concern: writes always go with ``w: "majority"`` (a
  ``w=0`` in the URI would mark a part stored unconfirmed, a ``w=1`` write
  can be rolled back on failover), and an unacknowledged result is refused
  as :class:`SinkUnavailable`. ``j`` is not set: on a replica set a majority
  acknowledgement is journaled already (``writeConcernMajorityJournalDefault``),
  an explicit ``j: true`` fails on members without a journal (in-memory
  engine), and Cosmos DB maps write concern to its own consistency level.
  (A standalone ``mongod`` may acknowledge up to ~100 ms before its journal
  flush; use a replica set.) Index builds at open use the same write
  concern; the admin queries keep the URI's read preference.
* Duplicate key (11000): the stored document's ``hash`` is read back from
  the primary with read concern ``majority`` (never a lagging secondary,
  whatever the URI's ``readPreference``); equal is success (the earlier
  write landed and is majority-committed), different is
  :class:`SinkConflict`. No such document yet (the earlier write is not
  majority-committed, or was rolled back) is :class:`SinkUnavailable`: the
  retry either finds it committed or inserts it.
* 79 / 100 (the deployment cannot satisfy ``w: "majority"``) and 148 (no
  majority read concern) are configuration, so :class:`SinkUnavailable`.
* 16500 / 429 / ``TooManyRequests`` (Cosmos DB): :class:`SinkRateLimited`
  with ``RetryAfterMs=NNN`` from the message, in seconds.
* 463 (Atlas), errors labelled ``RetryableError``/``RetryableWriteError``,
  network errors, server selection timeouts, not-primary and interrupted
  errors, 50 (``ExceededTimeLimit``) and other "may or may not have landed"
  errors: :class:`SinkUnavailable`. The flusher retries with the same
  ``_id``s, so a partly applied write retried is a success.
* ``DocumentTooLarge``, and the codes of :data:`DOCUMENT_ERRORS` as a
  write error (``writeErrors``, about one document): :class:`SinkRejected`.
  As a command error (``ok: 0``) only the size codes are: any other is
  about the request or the deployment (Cosmos DB answers every write of a
  URI without ``retryWrites=false`` with code 2), retried, never a dead
  letter for the whole backlog.
* The URI's ``timeoutMS`` is overridden (``None``): the sink's socket
  timeout bounds every operation, so a URI cannot make a write hang for
  minutes and hold up the flusher.
* The indexes are built at open as a best effort: a deployment that refuses
  one (an index with the same keys under another name, a role without
  ``createIndex``) gets a warning, and writes go on.
* Documents are read back as written: a sub-document holding ``$ref`` and
  ``$id`` (a client's ``details`` can) comes back from PyMongo as a
  ``DBRef``, which is turned back into the plain object (:func:`_plain`).

The URI comes from the environment variable named by ``uri_env``, read at
:meth:`MongoSink.open`. Neither it nor its credentials appear in any message:
errors are rebuilt from their class, code and a redacted, shortened message,
and raised ``from None``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import warnings
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import unquote

from bson.dbref import DBRef
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReadPreference
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WaitQueueTimeoutError,
    WriteConcernError,
    WriteError,
)
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from audit.config import MongoSinkConfig

from . import mongodb_uri_options
from .base import (
    Doc,
    Sink,
    SinkConflict,
    SinkError,
    SinkRateLimited,
    SinkRejected,
    SinkUnavailable,
    SinkUnreadable,
    decode_cursor,
    encode_cursor,
    odd_part,
    summarize_parts,
)

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
# Documents per page when verify walks every session id or security event.
ID_PAGE = 1000


def _a_string(field: str) -> dict[str, Any]:
    """A filter: ``field`` is a string, not an array holding one. MongoDB
    compares values of one type at a time, and ``$type`` and ``$gt`` match
    an array by any element of it (a sort, by its least): a forged value of
    another type ending a page of the listings verify walks ended them."""
    return {field: {"$type": "string", "$not": {"$type": "array"}}}


def _not_a_string(field: str) -> dict[str, Any]:
    """The documents :func:`_a_string` leaves out."""
    return {"$or": [{field: {"$not": {"$type": "string"}}}, {field: {"$type": "array"}}]}
RATE_LIMITED = frozenset({16500, 429})
# "May or may not have landed; try again": network, elections, shutdowns,
# time limits, Atlas 463, write concern failures.
RETRYABLE = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        50,  # MaxTimeMSExpired / ExceededTimeLimit (Cosmos DB)
        64,  # WriteConcernFailed
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        112,  # WriteConflict
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        463,  # Atlas: too many operations / cluster busy
        9001,  # SocketException
        10058,  # LegacyNotPrimary
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)
# Not about the document: the operator must fix it; retry meanwhile.
CONFIGURATION = frozenset(
    {
        13,  # Unauthorized
        18,  # AuthenticationFailed
        79,  # UnknownReplWriteConcern: no "majority" here
        100,  # UnsatisfiableWriteConcern
        148,  # ReadConcernMajorityNotEnabled
        8000,  # AtlasError
    }
)
# What is wrong with the document itself: sending it again cannot help, so a
# part or security event answered with one of these is dead-lettered. Any
# other error is taken as passing (retried, the part put aside if it keeps
# failing): a server code unknown here, say a shard's election without retry
# labels under retryWrites=false, must not turn parts into dead letters.
DOCUMENT_ERRORS = frozenset(
    {
        2,  # BadValue
        10,  # BSONObjectTooLarge
        14,  # TypeMismatch
        15,  # Overflow (nested deeper than 100 levels)
        16,  # InvalidLength (Cosmos DB: request entity too large)
        17,  # ProtocolError
        22,  # InvalidBSON
        52,  # DollarPrefixedFieldName
        53,  # InvalidIdField
        56,  # EmptyFieldName
        57,  # DottedFieldName
        121,  # DocumentValidationFailure
        10334,  # BSONObjectTooLarge (legacy)
        17280,  # KeyTooLong
    }
)
# The document-size codes, which mean the document even as a command error.
TOO_LARGE = frozenset({10, 16, 10334})
# Every write, and the duplicate check after one, whatever the URI says.
# wtimeout: with no majority reachable, a write answers (error 64, retried)
# after 10 s instead of waiting for the socket timeout.
WRITE_CONCERN = WriteConcern("majority", wtimeout=10_000)
READ_CONCERN = ReadConcern("majority")
RETRY_LABELS = ("RetryableError", "RetryableWriteError", "SystemOverloadedError")

_RETRY_AFTER_MS = re.compile(r"RetryAfterMs=(\d+)", re.IGNORECASE)
_MAX_MESSAGE = 300


# Digits of a hint past any real one (and past what int() takes, 4,300, or a
# float holds): read as this many ms, which the flusher caps as it caps any
# long hint (ratelimit.MAX_HINT).
_HINT_DIGITS = 12


def retry_after_from(message: str) -> float | None:
    """Seconds from a Cosmos DB ``RetryAfterMs=NNN`` in an error message.

    A number of hundreds of digits (an answer no real server gives) made
    ``int()`` or the division raise: an unexpected sink error, and after a
    few the part went to the dead letters, though the server had asked for
    a pause; it is a long hint instead."""
    m = _RETRY_AFTER_MS.search(message)
    if m is None:
        return None
    digits = m.group(1).lstrip("0")
    if len(digits) > _HINT_DIGITS:
        digits = "9" * _HINT_DIGITS
    return int(digits or "0") / 1000.0


def _uri_secrets(uri: str) -> list[str]:
    """The URI itself and its user name and password, raw and decoded."""
    secrets = [uri]
    rest = uri.split("://", 1)[-1]
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in authority:
        userinfo = authority.rsplit("@", 1)[0]
        for piece in userinfo.split(":", 1):
            if piece:
                secrets += [piece, unquote(piece)]
    # Longest first, so the URI is replaced before its pieces.
    return sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)


# The options whose files a client reads once, when it is made (its TLS context).
_TLS_FILE_OPTIONS = frozenset({"tlscafile", "tlscertificatekeyfile", "tlscrlfile"})
_FileState = tuple[str, tuple[int, int, int, int, int] | None]


def _tls_files(uri: str, options: dict[str, Any]) -> tuple[_FileState, ...]:
    """The files a client made now would read for its TLS context (those the
    URI's or ``options``' TLS file options name, and the default CA file), each
    with its device, inode, size, change and modification times (None: no
    such file). A client is made with what they held then and keeps it."""
    paths = [str(v) for k, v in options.items() if k.lower() in _TLS_FILE_OPTIONS]
    paths += [value for key, value in mongodb_uri_options(uri) if key in _TLS_FILE_OPTIONS]
    default = ssl.get_default_verify_paths().cafile
    if default:
        paths.append(default)
    out: list[_FileState] = []
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            out.append((path, None))
        else:
            out.append((path, (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns,
                               st.st_mtime_ns)))
    return tuple(out)


def _errmsg(exc: PyMongoError) -> str:
    details = getattr(exc, "details", None)
    if isinstance(details, dict) and isinstance(details.get("errmsg"), str):
        return str(details["errmsg"])
    return str(exc)


def _code(exc: PyMongoError) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _labels(exc: PyMongoError) -> bool:
    return any(exc.has_error_label(label) for label in RETRY_LABELS)


def _rate_limited(code: Any, errmsg: str) -> bool:
    """Throttled: a throttling code, or Cosmos DB's words under another code,
    but never under a code that is about the document. Such a message may
    quote the document (KeyTooLong quotes the key, a field-name error the
    field): a record holding "TooManyRequests" was retried as rate limited
    for good, and rate limits never count towards a dead letter."""
    return code in RATE_LIMITED or (
        code not in DOCUMENT_ERRORS
        and ("TooManyRequests" in errmsg or "Request rate is large" in errmsg)
    )


def _failed_login(exc: PyMongoError) -> bool:
    """The deployment refused our credentials: 18, or Atlas's own spelling of
    it (8000 ``AtlasError``, "bad auth : Authentication failed.")."""
    code = _code(exc)
    return code == 18 or (code == 8000 and "bad auth" in _errmsg(exc))


def _passing(exc: PyMongoError) -> bool:
    """Connection trouble, a time limit, an election: it passes by itself."""
    return (
        isinstance(exc, (ConnectionFailure, ExecutionTimeout, WaitQueueTimeoutError))
        or _code(exc) in RETRYABLE
        or _labels(exc)
    )


def _plain(value: Any) -> Any:
    """``value`` with every ``DBRef`` the driver made turned back into the
    object that was stored (``$ref``, ``$id``, ``$db`` if not null, the rest):
    the record as written, whose canonical JSON the chain covers."""
    if isinstance(value, DBRef):
        return {k: _plain(v) for k, v in value.as_doc().items()}
    if isinstance(value, dict):
        if any(isinstance(v, (dict, list, DBRef)) for v in value.values()):
            return {k: _plain(v) for k, v in value.items()}
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# What JSON carries (bool is an int, Int64 too); a dict or list is looked into.
_JSON_LEAVES = (str, int, float, type(None))


def _not_json(value: Any) -> str | None:
    """The type name of the first value in ``value`` (after :func:`_plain`)
    that JSON cannot carry: a BSON date, ObjectId, Decimal128, binary, regex,
    timestamp, MinKey/MaxKey, as another writer (mongosh, an import, a
    driver inserting without ``_id``) may leave them; else ``None``."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            if not isinstance(v, _JSON_LEAVES):
                found = _not_json(v)
                if found is not None:
                    return found
        return None
    return None if isinstance(value, _JSON_LEAVES) else type(value).__name__


# The query indexes: (collection, keys, name). The sort keys follow each
# equality filter, so that a filtered listing reads its page off the index.
INDEXES: tuple[tuple[str, list[tuple[str, int]], str], ...] = (
    ("sessions", [("session_start_time", DESCENDING), ("session_id", DESCENDING)],
     "session_start_time"),
    ("sessions", [("user", ASCENDING), ("session_start_time", DESCENDING),
                  ("session_id", DESCENDING)], "user_start"),
    ("sessions", [("session_id", ASCENDING), ("part", ASCENDING)], "session_id_part"),
    ("security", [("ts", DESCENDING), ("_id", DESCENDING)], "ts"),
    ("security", [("action", ASCENDING), ("ts", DESCENDING), ("_id", DESCENDING)],
     "action_ts_id"),
)


def _durable(coll: AsyncCollection[Doc]) -> AsyncCollection[Doc]:
    """``coll`` for writes and the duplicate check, whatever the URI says."""
    return coll.with_options(
        write_concern=WRITE_CONCERN,
        read_preference=ReadPreference.PRIMARY,
        read_concern=READ_CONCERN,
    )


class MongoSink(Sink):
    type = "mongodb"
    queryable = True

    def __init__(
        self,
        cfg: MongoSinkConfig,
        *,
        server_selection_timeout_ms: int = 5000,
        connect_timeout_ms: int = 5000,
        socket_timeout_ms: int = 30000,
        client_options: dict[str, Any] | None = None,
        readonly: bool = False,
    ) -> None:
        self.cfg = cfg
        # verify: the open builds no index (verify changes nothing in what it
        # checks, and the read-only role it should run with may not; five
        # warnings said so), it only asks the deployment whether it answers.
        self.readonly = readonly
        self._options: dict[str, Any] = {
            "serverSelectionTimeoutMS": server_selection_timeout_ms,
            "connectTimeoutMS": connect_timeout_ms,
            "socketTimeoutMS": socket_timeout_ms,
            "appname": "session-audit",
            "timeoutMS": None,  # over the URI's: the timeouts above bound each operation
            **(client_options or {}),
        }
        self._client: AsyncMongoClient[Doc] | None = None
        # The client of the last failed open, its URI, its TLS files as they
        # were when it was made, and its event loop: the next open goes on
        # with it (see _kept_client).
        self._kept: tuple[AsyncMongoClient[Doc], str, tuple[_FileState, ...],
                          asyncio.AbstractEventLoop] | None = None
        self._sessions: AsyncCollection[Doc] | None = None
        self._security: AsyncCollection[Doc] | None = None
        # The same collections for writes and the duplicate check: majority
        # write concern, primary, majority read concern (see the docstring).
        self._sessions_w: AsyncCollection[Doc] | None = None
        self._security_w: AsyncCollection[Doc] | None = None
        self._secrets: list[str] = []

    # -- errors --------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if len(text) > _MAX_MESSAGE:
            text = text[:_MAX_MESSAGE] + "..."
        return text

    def _message(self, what: str, exc: BaseException, errmsg: str | None = None) -> str:
        code = getattr(exc, "code", None)
        text = errmsg if errmsg is not None else str(exc)
        head = f"mongodb sink: {what}: {type(exc).__name__}"
        if isinstance(code, int):
            head += f" (code {code})"
        return self._redact(f"{head}: {text}")

    def _classify(self, what: str, exc: PyMongoError) -> SinkError:
        """Map one PyMongo error (not a bulk error) to a sink error."""
        code = _code(exc)
        errmsg = _errmsg(exc)
        msg = self._message(what, exc, errmsg)
        if _rate_limited(code, errmsg):
            return SinkRateLimited(msg, retry_after=retry_after_from(errmsg))
        if _passing(exc) or isinstance(exc, WriteConcernError) or code in CONFIGURATION:
            return SinkUnavailable(msg)
        if code in DOCUMENT_ERRORS and (
            isinstance(exc, WriteError) or (isinstance(exc, OperationFailure) and code in TOO_LARGE)
        ):
            return SinkRejected(msg)
        if "retrywrites" in errmsg.lower():
            msg += " (add retryWrites=false to the URI)"
        # Unknown codes, command errors, ConfigurationError, InvalidOperation:
        # not known to be the document; retried (see DOCUMENT_ERRORS).
        return SinkUnavailable(msg)

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        uri = os.environ.get(self.cfg.uri_env, "")
        if not uri:
            raise SinkUnavailable(
                f"mongodb sink: environment variable {self.cfg.uri_env} is not set"
            )
        self._secrets = _uri_secrets(uri)
        files = _tls_files(uri, self._options)
        client = await self._kept_client(uri, files)
        if client is None:
            client = self._new_client(uri)
        try:
            db = client[self.cfg.database]
            sessions = db[self.cfg.sessions_collection]
            security = db[self.cfg.security_collection]
            # Acknowledged index builds too (a w=0 URI would hide a failure).
            sessions_w, security_w = _durable(sessions), _durable(security)
            if self.readonly:
                await db.command("ping")
            else:
                await self._build_indexes(sessions_w, security_w)
        except PyMongoError as exc:
            # Kept, not closed: the next open goes on with it (_kept_client).
            self._kept = (client, uri, files, asyncio.get_running_loop())
            err = self._classify("open", exc)
            # Opening never fails for good: the engine calls open() again.
            if not isinstance(err, SinkUnavailable):
                err = SinkUnavailable(str(err))
            raise err from None
        except BaseException:
            await client.close()
            raise
        self._client, self._sessions, self._security = client, sessions, security
        self._sessions_w, self._security_w = sessions_w, security_w

    def _new_client(self, uri: str) -> AsyncMongoClient[Doc]:
        try:
            # PyMongo warns about unknown URI options; log them, redacted.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, **self._options)
            for w in caught:
                log.warning("%s", self._redact(f"mongodb sink: {w.message}"))
        except (ConfigurationError, ValueError, TypeError, OSError) as exc:
            raise SinkUnavailable(
                self._redact(
                    f"mongodb sink: the URI in {self.cfg.uri_env} is not usable: "
                    f"{type(exc).__name__}: {exc}"
                )
            ) from None
        return client

    async def _kept_client(
        self, uri: str | None, files: tuple[_FileState, ...] = ()
    ) -> AsyncMongoClient[Doc] | None:
        """The client of the last failed open, if it was made from ``uri`` on
        this event loop, its TLS ``files`` as they are now (:func:`_tls_files`:
        a CA file put right after a failed certificate check is read by a new
        client; the kept one holds the old file's context, and failed for
        ever); any other is closed (or, made on another loop, let go).

        A failed open used to close its client, and the flusher made a new one
        at the next attempt. Closing a client cancels its monitors' pending
        connects, and PyMongo (4.20) leaves a socket cancelled while connecting
        open, in a reference cycle only the garbage collector frees, which
        runs rarely here (audit.runtime.tune_gc): with the deployment
        unreachable (connects refused; or unanswered, when the connect timeout
        outlasts server selection) the server gained up to a descriptor per
        failed open, towards its descriptor limit. A
        kept client's monitors go on checking the deployment, and each of
        their connects ends in its own timeout or refusal, which closes its
        socket."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        client, kept_uri, kept_files, loop = kept
        if loop is not asyncio.get_running_loop():
            return None  # bound to another (likely closed) loop: unusable here
        if kept_uri == uri and kept_files == files:
            return client
        await client.close()
        return None

    async def _build_indexes(
        self, sessions: AsyncCollection[Doc], security: AsyncCollection[Doc]
    ) -> None:
        """The query indexes (:data:`INDEXES`), each as a best effort.

        An error that passes (the deployment unreachable, an election, a rate
        limit), a failed login (Atlas's too: :func:`_failed_login`; else the
        sink opened with five index warnings, and the indexes never came once
        the login worked), or anything but the server's own answer fails
        the open, which is tried again: a ``mongodb+srv://`` name is looked up
        at the first operation, and while it does not resolve every build
        fails with ``ConfigurationError`` without a server asked (an open
        that went on would never build the indexes once it resolved). Any
        other refusal (85/86: an index with these keys or this name exists
        otherwise, made by hand; 13: a role without ``createIndex``) is a
        warning: the writes do not need the indexes, the admin listings are
        slower without them, and a sink that never opened would hold every
        part back until the spool is full.
        """
        colls = {"sessions": sessions, "security": security}
        for which, keys, name in INDEXES:
            try:
                await colls[which].create_index(keys, name=name)
            except PyMongoError as exc:
                err = self._classify(f"create index {name}", exc)
                if (not isinstance(exc, OperationFailure) or _passing(exc)
                        or isinstance(err, SinkRateLimited) or _failed_login(exc)):
                    raise
                log.warning("%s; writes go on without that index (admin listings are"
                            " slower)", err)

    async def close(self) -> None:
        await self._kept_client(None)
        client, self._client = self._client, None
        self._sessions = self._security = None
        self._sessions_w = self._security_w = None
        if client is not None:
            await client.close()

    def _colls(self) -> tuple[AsyncCollection[Doc], AsyncCollection[Doc]]:
        if self._sessions is None or self._security is None:
            raise SinkUnavailable("mongodb sink is not open")
        return self._sessions, self._security

    def _write_colls(self) -> tuple[AsyncCollection[Doc], AsyncCollection[Doc]]:
        if self._sessions_w is None or self._security_w is None:
            raise SinkUnavailable("mongodb sink is not open")
        return self._sessions_w, self._security_w

    # -- writing -------------------------------------------------------------

    async def _stored_hashes(
        self, coll: AsyncCollection[Doc], ids: Iterable[str]
    ) -> dict[str, Any]:
        try:
            cursor = coll.find({"_id": {"$in": list(ids)}}, {"hash": 1})
            return {str(d["_id"]): d.get("hash") for d in await cursor.to_list(None)}
        except PyMongoError as exc:
            raise self._classify("reading stored hashes", exc) from None

    @staticmethod
    def _not_committed(doc_id: str) -> SinkUnavailable:
        return SinkUnavailable(
            f"mongodb sink: duplicate key for {doc_id} but no majority-committed document "
            "with that _id yet; retrying"
        )

    async def write_part(self, part: Doc) -> None:
        sessions, _ = self._write_colls()
        doc_id = str(part["_id"])
        try:
            result = await sessions.insert_one(part)
        except DuplicateKeyError:
            stored = await self._stored_hashes(sessions, [doc_id])
            if doc_id not in stored:
                raise self._not_committed(doc_id) from None
            if stored[doc_id] != part["hash"]:
                raise SinkConflict(f"{doc_id} is stored with a different hash") from None
            return
        except (BSONError, OverflowError) as exc:  # DocumentTooLarge, InvalidDocument, big ints
            raise SinkRejected(self._message(f"insert {doc_id}", exc)) from None
        except PyMongoError as exc:
            raise self._classify(f"insert {doc_id}", exc) from None
        if not result.acknowledged:
            raise SinkUnavailable(f"mongodb sink: insert {doc_id}: write not acknowledged")

    async def write_security_events(self, events: list[Doc]) -> None:
        if not events:
            return
        _, security = self._write_colls()
        try:
            result = await security.insert_many(events, ordered=False)
            if not result.acknowledged:
                raise SinkUnavailable("mongodb sink: insert_many: write not acknowledged")
            return
        except BulkWriteError as exc:
            duplicates = self._bulk_errors(exc)
        except (BSONError, OverflowError) as exc:
            raise SinkRejected(self._message("insert_many", exc)) from None
        except PyMongoError as exc:
            raise self._classify("insert_many", exc) from None
        want = {str(ev["_id"]): ev["hash"] for ev in events}
        stored = await self._stored_hashes(security, duplicates)
        for doc_id in duplicates:
            if doc_id not in stored:
                raise self._not_committed(doc_id)
            if stored[doc_id] != want.get(doc_id):
                raise SinkConflict(f"{doc_id} is stored with a different hash")

    def _bulk_errors(self, exc: BulkWriteError) -> list[str]:
        """The ``_id``s that failed as duplicates; raise for any other error.

        Priority: rate limited, then unavailable (the whole batch is retried,
        which is idempotent), then rejected.
        """
        details: dict[str, Any] = dict(exc.details or {})
        write_errors: list[dict[str, Any]] = list(details.get("writeErrors") or [])
        concern_errors: list[dict[str, Any]] = list(details.get("writeConcernErrors") or [])
        duplicates: list[str] = []
        rate_limited: SinkRateLimited | None = None
        unavailable: SinkUnavailable | None = None
        rejected: SinkRejected | None = None
        for err in write_errors:
            code = err.get("code")
            errmsg = str(err.get("errmsg", ""))
            labels = err.get("errorLabels") or []
            text = self._redact(
                f"mongodb sink: insert_many: write error (code {code}) "
                f"at index {err.get('index')}: {errmsg}"
            )
            if code == DUPLICATE_KEY:
                op = err.get("op") or {}
                if "_id" in op:
                    duplicates.append(str(op["_id"]))
                else:
                    unavailable = unavailable or SinkUnavailable(text)
            elif _rate_limited(code, errmsg):
                retry = retry_after_from(errmsg)
                if rate_limited is None or (retry or 0) > (rate_limited.retry_after or 0):
                    rate_limited = SinkRateLimited(text, retry_after=retry)
            elif code in DOCUMENT_ERRORS and not any(label in labels for label in RETRY_LABELS):
                rejected = rejected or SinkRejected(text)
            else:
                unavailable = unavailable or SinkUnavailable(text)
        for err in concern_errors:
            unavailable = unavailable or SinkUnavailable(
                self._redact(
                    f"mongodb sink: insert_many: write concern error (code {err.get('code')}): "
                    f"{err.get('errmsg', '')}"
                )
            )
        if not write_errors and not concern_errors:
            unavailable = SinkUnavailable(self._message("insert_many", exc))
        for found in (rate_limited, unavailable, rejected):
            if found is not None:
                raise found from None
        return duplicates

    # -- queries -------------------------------------------------------------

    def _handed_out(self, what: str, docs: Iterable[Doc]) -> list[Doc]:
        """``docs`` as the admin API hands them out (:func:`_plain`); a
        document holding a value JSON cannot carry is :class:`SinkUnreadable`
        (503 ``sink_unavailable``, verify's finding), not a 500 when the
        answer is encoded."""
        out = []
        for doc in docs:
            doc = _plain(doc)
            odd = _not_json(doc)
            if odd is not None:
                raise SinkUnreadable(self._redact(
                    f"mongodb sink: {what}: the document with _id {doc.get('_id')!r} holds"
                    f" a {odd}, which JSON cannot carry (another writer's)"))
            out.append(doc)
        return out

    def _parts_handed_out(self, what: str, docs: Iterable[Doc]) -> list[Doc]:
        """:meth:`_handed_out` for session parts, which the admin API orders
        by ``part`` and merges by each event's ``seq``: a part whose ``part``
        is no number (missing, null, text: another writer's) was a KeyError
        or TypeError there, or whose ``events`` are not events with an
        integer ``seq``: a 500. It is :class:`SinkUnreadable` too."""
        parts = self._handed_out(what, docs)
        for p in parts:
            if odd_part(p):
                raise SinkUnreadable(self._redact(
                    f"mongodb sink: {what}: the part with _id {p.get('_id')!r} has no"
                    " number or events without a seq (another writer's)"))
        return parts

    def _undecodable(self, what: str, exc: BSONError) -> SinkUnreadable:
        """A document the driver cannot decode (a string that is not UTF-8)."""
        return SinkUnreadable(self._message(what, exc))

    async def list_sessions(
        self,
        *,
        user: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        sessions, _ = self._colls()
        # A part 0 without a string session_id (another writer's: missing, a
        # number, an array) has no parts to summarize by it (a KeyError or an
        # IndexError, a 500); verify lists it among its unchecked_records.
        query: dict[str, Any] = {"part": 0, **_a_string("session_id")}
        start_range: dict[str, Any] = {}
        if user is not None:
            query["user"] = user
        if since is not None:
            start_range["$gte"] = since
        if until is not None:
            start_range["$lte"] = until
        if start_range:
            query["session_start_time"] = start_range
        if cursor is not None:
            start, sid = decode_cursor(cursor)
            query["$or"] = [
                {"session_start_time": {"$lt": start}},
                {"session_start_time": start, "session_id": {"$lt": sid}},
            ]
        try:
            heads = await (
                sessions.find(query, {"session_id": 1, "session_start_time": 1})
                .sort([("session_start_time", DESCENDING), ("session_id", DESCENDING)])
                .limit(limit + 1)
                .to_list(None)
            )
            more = len(heads) > limit
            heads = heads[:limit]
            ids = [str(h["session_id"]) for h in heads]
            parts: dict[str, list[Doc]] = {sid: [] for sid in ids}
            if ids:
                # (An array holding one of the ids matches $in, and is no key.)
                found = await sessions.find(
                    {"session_id": {"$in": ids, "$not": {"$type": "array"}}}, {"events": 0}
                ).to_list(None)
                for p in self._parts_handed_out("list sessions", found):
                    # A part whose id only matched $in under the collection's
                    # collation (a case-insensitive default a DBA set): not
                    # one of this page's sessions (was a KeyError, a 500).
                    mine = parts.get(str(p["session_id"]))
                    if mine is not None:
                        mine.append(p)
        except BSONError as exc:
            raise self._undecodable("list sessions", exc) from exc
        except PyMongoError as exc:
            raise self._classify("list sessions", exc) from None
        # A session with no parts by now was removed after its part 0 was
        # read, or the second read went to a secondary behind the first (the
        # URI's read preference): left out (summarize_parts([]) was an
        # IndexError, a 500). The page still ends at its last head.
        out = [summarize_parts(parts[sid]) for sid in ids if parts[sid]]
        next_cursor = None
        if more and heads:
            last = heads[-1]
            next_cursor = encode_cursor(last.get("session_start_time"), ids[-1])
        return out, next_cursor

    async def session_ids(self) -> AsyncIterator[str]:
        """Every session with any part stored (the listing above starts from
        part 0: verify must also see a session whose part 0 is missing), in
        pages of :data:`ID_PAGE` parts by the (session_id, part) index. No
        cursor stays open while verify checks each session (a server drops
        one idle for 10 minutes), and no server stage holds every id."""
        sessions, _ = self._colls()
        after: str | None = None
        while True:
            query: dict[str, Any] = _a_string("session_id")
            if after is not None:
                query = {"$and": [query, {"session_id": {"$gt": after}}]}
            try:
                page = await (
                    sessions.find(query, {"session_id": 1, "_id": 0})
                    .sort([("session_id", ASCENDING), ("part", ASCENDING)])
                    .limit(ID_PAGE)
                    .to_list(None)
                )
            except PyMongoError as exc:
                raise self._classify("list session ids", exc) from None
            ids = list(dict.fromkeys(str(d["session_id"]) for d in page))
            for sid in ids:
                yield sid
            if len(page) < ID_PAGE:
                return
            after = ids[-1]  # its other parts, if any, are past this page: skipped

    async def security_events_oldest_first(self) -> AsyncIterator[Doc]:
        """Oldest ``ts`` first, in pages of :data:`ID_PAGE` on the ``ts``
        index, each yielded before the next is read (the default holds all)."""
        _, security = self._colls()
        after: tuple[Any, Any] | None = None
        while True:
            # Only a string ts (what the sink writes): MongoDB compares values
            # of one type only, so a page ending in an event with a numeric ts
            # (forged) read no event with a string one after it. The others
            # are unchecked_records.
            query: dict[str, Any] = _a_string("ts")
            if after is not None:
                query = {"$and": [query, {"$or": [{"ts": {"$gt": after[0]}},
                                                  {"ts": after[0], "_id": {"$gt": after[1]}}]}]}
            try:
                page = await (
                    security.find(query)
                    .sort([("ts", ASCENDING), ("_id", ASCENDING)])
                    .limit(ID_PAGE)
                    .to_list(None)
                )
            except PyMongoError as exc:
                raise self._classify("list security events", exc) from None
            for doc in page:
                yield _plain(doc)
            if len(page) < ID_PAGE:
                return
            after = (page[-1].get("ts"), page[-1].get("_id"))

    async def unchecked_records(self) -> list[str]:
        """Documents verify cannot place (the first :data:`ID_PAGE` of each
        kind): a part whose ``session_id`` is not a string (listed under its
        text by :meth:`session_ids`, where no part is found: it passed as an
        empty session), a security event whose ``ts`` is not one (see
        :meth:`security_events_oldest_first`). The sink writes neither."""
        sessions, security = self._colls()
        out: list[str] = []
        for coll, what, field in ((sessions, "a session part", "session_id"),
                                  (security, "a security event", "ts")):
            try:
                docs = await (coll.find(_not_a_string(field), {"_id": 1})
                              .sort("_id", ASCENDING).limit(ID_PAGE).to_list(None))
            except PyMongoError as exc:
                raise self._classify(f"list {what}s without a string {field}", exc) from None
            out.extend(f"{what} with _id {d.get('_id')!r} and no string {field}" for d in docs)
            if len(docs) == ID_PAGE:
                out.append(f"(the first {ID_PAGE} such; there may be more)")
        return out

    async def get_session_parts(self, session_id: str) -> list[Doc]:
        sessions, _ = self._colls()
        try:
            parts = await (
                sessions.find({"session_id": session_id}).sort("part", ASCENDING).to_list(None)
            )
        except BSONError as exc:
            raise self._undecodable("get session parts", exc) from exc
        except PyMongoError as exc:
            raise self._classify("get session parts", exc) from None
        return self._parts_handed_out("get session parts", parts)

    async def session_part_heads(self, session_id: str) -> list[Doc]:
        """Without their events, on the server's side (a projection): what
        one session costs here is its parts' few fields, not its events."""
        sessions, _ = self._colls()
        try:
            heads = await (
                sessions.find({"session_id": session_id}, {"events": 0})
                .sort("part", ASCENDING).to_list(None)
            )
        except BSONError as exc:
            raise self._undecodable("get session part heads", exc) from exc
        except PyMongoError as exc:
            raise self._classify("get session part heads", exc) from None
        return self._parts_handed_out("get session part heads", heads)

    async def session_part(self, session_id: str, part: Any) -> list[Doc]:
        sessions, _ = self._colls()
        try:
            parts = await (
                sessions.find({"session_id": session_id, "part": part}).sort("_id", ASCENDING)
                .to_list(None)
            )
        except BSONError as exc:
            raise self._undecodable("get session part", exc) from exc
        except PyMongoError as exc:
            raise self._classify("get session part", exc) from None
        return self._parts_handed_out("get session part", parts)

    async def list_security_events(
        self,
        *,
        since: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Doc], str | None]:
        _, security = self._colls()
        query: dict[str, Any] = {}
        if since is not None:
            query["ts"] = {"$gte": since}
        if kind is not None:
            query["action"] = kind
        if cursor is not None:
            ts, eid = decode_cursor(cursor)
            query["$or"] = [{"ts": {"$lt": ts}}, {"ts": ts, "_id": {"$lt": eid}}]
        try:
            docs = await (
                security.find(query)
                .sort([("ts", DESCENDING), ("_id", DESCENDING)])
                .limit(limit + 1)
                .to_list(None)
            )
        except BSONError as exc:
            raise self._undecodable("list security events", exc) from exc
        except PyMongoError as exc:
            raise self._classify("list security events", exc) from None
        more = len(docs) > limit
        docs = self._handed_out("list security events", docs[:limit])
        # (An event without ts, another writer's, sorts last: a page ends at it.)
        last = docs[-1] if docs else {}
        next_cursor = encode_cursor(last.get("ts"), last.get("_id")) if more and docs else None
        return docs, next_cursor
