"""TDS wire format: packets, the login handshake messages, request decoding and response tokens.

Everything here is pure bytes-in/bytes-out so that it can be unit-tested without sockets; the
session logic that drives it lives in ``server.py``. The layout follows MS-TDS and the facts checked
against the real ODBC Driver 18 in shared/docs/tds.md:

* a *message* is one or more *packets* (8-byte big-endian header, EOM on the last one);
* PRELOGIN is an option table; LOGIN7 a fixed block of offsets into UTF-16LE strings plus the
  FeatureExt block that carries the FEDAUTH access token;
* requests (SQL_BATCH, RPC, transaction manager) start with ALL_HEADERS;
* responses are token streams (ENVCHANGE, INFO/ERROR, LOGINACK, COLMETADATA, ROW, DONE...).

Values are typed with :class:`SqlType`, the small subset of SQL Server types the emulator returns;
``decode_type_info``/``decode_value`` read the types the driver sends as RPC parameters.
"""

from __future__ import annotations

import datetime as dt
import decimal
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

HEADER = struct.Struct(">BBHHBB")
HEADER_SIZE = 8
MAX_PRELOGIN_PACKET = 4096


class PacketType(IntEnum):
    SQL_BATCH = 0x01
    RPC = 0x03
    RESPONSE = 0x04
    ATTENTION = 0x06
    FEDAUTH_TOKEN = 0x08
    TRANSACTION_MANAGER = 0x0E
    LOGIN7 = 0x10
    PRELOGIN = 0x12


STATUS_EOM = 0x01


class ProtocolError(Exception):
    """The client sent something this server cannot decode; the session is closed."""


def packetize(ptype: int, payload: bytes, packet_size: int, spid: int = 1) -> bytes:
    """Split ``payload`` into packets of at most ``packet_size`` bytes, EOM on the last."""
    chunk = max(packet_size - HEADER_SIZE, 1)
    out = bytearray()
    pieces = [payload[i : i + chunk] for i in range(0, len(payload), chunk)] or [b""]
    for index, piece in enumerate(pieces):
        status = STATUS_EOM if index == len(pieces) - 1 else 0
        out += HEADER.pack(ptype, status, len(piece) + HEADER_SIZE, spid, (index + 1) % 256, 0)
        out += piece
    return bytes(out)


def parse_header(header: bytes) -> tuple[int, int, int]:
    """(type, status, payload length) of an 8-byte packet header."""
    ptype, status, length, _spid, _pid, _window = HEADER.unpack(header)
    if length < HEADER_SIZE:
        raise ProtocolError(f"packet length {length} is shorter than its header")
    return ptype, status, length - HEADER_SIZE


# --- small readers and writers -----------------------------------------------------------------


class Reader:
    """Cursor over a payload with the little-endian primitives TDS uses."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("truncated message")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def b_varchar(self) -> str:
        return self.take(self.u8() * 2).decode("utf-16-le")

    def us_varchar(self) -> str:
        return self.take(self.u16() * 2).decode("utf-16-le")


def b_varchar(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    return bytes([len(raw) // 2]) + raw


def us_varchar(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    return struct.pack("<H", len(raw) // 2) + raw


# --- PRELOGIN ------------------------------------------------------------------------------------


class PreloginOption(IntEnum):
    VERSION = 0x00
    ENCRYPTION = 0x01
    INSTOPT = 0x02
    THREADID = 0x03
    MARS = 0x04
    TRACEID = 0x05
    FEDAUTHREQUIRED = 0x06
    NONCEOPT = 0x07


class Encryption(IntEnum):
    OFF = 0x00
    ON = 0x01
    NOT_SUP = 0x02
    REQ = 0x03


def parse_prelogin(payload: bytes) -> dict[int, bytes]:
    """Option token -> option data of a PRELOGIN payload (offsets/lengths are big-endian)."""
    options: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0xFF:
        if pos + 5 > len(payload):
            raise ProtocolError("truncated PRELOGIN option table")
        token = payload[pos]
        offset, length = struct.unpack(">HH", payload[pos + 1 : pos + 5])
        options[token] = payload[offset : offset + length]
        pos += 5
    return options


def build_prelogin(options: Sequence[tuple[int, bytes]]) -> bytes:
    """A PRELOGIN payload from ``(token, data)`` pairs, in the given order."""
    table_len = 5 * len(options) + 1
    table = bytearray()
    data = bytearray()
    for token, value in options:
        table += struct.pack(">BHH", token, table_len + len(data), len(value))
        data += value
    return bytes(table) + b"\xff" + bytes(data)


# --- LOGIN7 --------------------------------------------------------------------------------------

FEATURE_FEDAUTH = 0x02
FEATURE_TERMINATOR = 0xFF
FEDAUTH_LIBRARY_SECURITY_TOKEN = 0x01
# The client library (ADAL, now MSAL) acquires the token itself after the server's FEDAUTHINFO.
FEDAUTH_LIBRARY_ADAL = 0x02
TDS_VERSION_74 = 0x74000004
OPTION_FLAGS2_INTEGRATED_SECURITY = 0x80
OPTION_FLAGS3_EXTENSION = 0x10


@dataclass
class Login7:
    tds_version: int
    packet_size: int
    hostname: str
    username: str
    has_password: bool
    app_name: str
    server_name: str
    database: str
    integrated_security: bool
    fedauth_library: int | None = None
    fedauth_echo: bool = False
    fedauth_workflow: int | None = None  # ADAL library only: the driver's authentication mode
    access_token: str | None = None
    features: list[int] = field(default_factory=list)


def _login_string(payload: bytes, field_offset: int) -> str:
    offset, length = struct.unpack_from("<HH", payload, field_offset)
    return payload[offset : offset + 2 * length].decode("utf-16-le", errors="replace")


def parse_login7(payload: bytes) -> Login7:
    if len(payload) < 94:
        raise ProtocolError("LOGIN7 is shorter than its fixed part")
    tds_version = struct.unpack_from("<I", payload, 4)[0]
    packet_size = struct.unpack_from("<I", payload, 8)[0]
    flags2 = payload[25]
    flags3 = payload[27]
    _pw_offset, pw_length = struct.unpack_from("<HH", payload, 44)
    login = Login7(
        tds_version=tds_version,
        packet_size=packet_size,
        hostname=_login_string(payload, 36),
        username=_login_string(payload, 40),
        has_password=pw_length > 0,
        app_name=_login_string(payload, 48),
        server_name=_login_string(payload, 52),
        database=_login_string(payload, 68),
        integrated_security=bool(flags2 & OPTION_FLAGS2_INTEGRATED_SECURITY),
    )
    if flags3 & OPTION_FLAGS3_EXTENSION:
        ext_offset, ext_length = struct.unpack_from("<HH", payload, 56)
        if ext_length >= 4:
            feature_pos = struct.unpack_from("<I", payload, ext_offset)[0]
            _parse_features(payload, feature_pos, login)
    return login


def _parse_features(payload: bytes, pos: int, login: Login7) -> None:
    reader = Reader(payload, pos)
    while reader.remaining() > 0:
        feature = reader.u8()
        if feature == FEATURE_TERMINATOR:
            return
        data = reader.take(reader.u32())
        login.features.append(feature)
        if feature == FEATURE_FEDAUTH and data:
            options = data[0]
            login.fedauth_library = options >> 1
            login.fedauth_echo = bool(options & 0x01)
            if login.fedauth_library == FEDAUTH_LIBRARY_SECURITY_TOKEN and len(data) >= 5:
                size = struct.unpack_from("<I", data, 1)[0]
                token = data[5 : 5 + size]
                login.access_token = token.decode("utf-16-le", errors="replace")
            elif login.fedauth_library == FEDAUTH_LIBRARY_ADAL and len(data) >= 2:
                login.fedauth_workflow = data[1]


def parse_fedauth_token(payload: bytes) -> str:
    """The access token of a FEDAUTH_TOKEN message (type 0x08, ADAL library).

    ``DataLen u32 | TokenLen u32 | token (UTF-16LE) | [Nonce, 32 bytes]`` ([MS-TDS] 2.2.6.3).
    """
    reader = Reader(payload)
    data_len = reader.u32()
    if data_len > reader.remaining():
        raise ProtocolError("FEDAUTH_TOKEN is shorter than its DataLen")
    size = reader.u32()
    if size > reader.remaining():
        raise ProtocolError("FEDAUTH_TOKEN token length exceeds the message")
    # ODBC Driver 18 sends the token NUL-terminated (what it fetched, as a C string).
    return reader.take(size).decode("utf-16-le", errors="replace").rstrip("\x00")


# --- requests ------------------------------------------------------------------------------------


def skip_all_headers(payload: bytes) -> int:
    """Offset just past the ALL_HEADERS block (absent in a few very old clients)."""
    if len(payload) < 4:
        return 0
    total = struct.unpack_from("<I", payload, 0)[0]
    if total < 4 or total > len(payload):
        return 0
    return int(total)


def parse_sql_batch(payload: bytes) -> str:
    return payload[skip_all_headers(payload) :].decode("utf-16-le", errors="replace")


class TmRequest(IntEnum):
    GET_DTC_ADDRESS = 0
    PROPAGATE = 1
    BEGIN = 5
    PROMOTE = 6
    COMMIT = 7
    ROLLBACK = 8
    SAVE = 9


@dataclass
class TransactionRequest:
    kind: int
    name: str = ""
    begin_after: bool = False  # COMMIT/ROLLBACK with fBeginXact: start a new transaction at once


def parse_transaction_request(payload: bytes) -> TransactionRequest:
    reader = Reader(payload, skip_all_headers(payload))
    kind = reader.u16()
    request = TransactionRequest(kind)
    if kind == TmRequest.BEGIN:
        reader.u8()  # isolation level
        request.name = reader.b_varchar()
    elif kind in (TmRequest.COMMIT, TmRequest.ROLLBACK):
        request.name = reader.b_varchar()
        if reader.remaining():
            request.begin_after = bool(reader.u8() & 0x01)
    return request


# --- types ---------------------------------------------------------------------------------------

# SQL_Latin1_General_CP1_CI_AS: LCID 0x0409 with the case/accent flags, sort id 52.
COLLATION = bytes.fromhex("0904d00034")
PLP_NULL = 0xFFFFFFFFFFFFFFFF
PLP_UNKNOWN = 0xFFFFFFFFFFFFFFFE
_DATE_EPOCH = dt.date(1, 1, 1)


class Kind(IntEnum):
    INT = 0x26  # INTN
    BIT = 0x68  # BITN
    FLOAT = 0x6D  # FLTN
    DECIMAL = 0x6A  # DECIMALN
    GUID = 0x24
    DATE = 0x28  # DATEN
    TIME = 0x29  # TIMEN
    DATETIME2 = 0x2A  # DATETIME2N
    DATETIMEOFFSET = 0x2B
    DATETIME = 0x6F  # DATETIMN
    NVARCHAR = 0xE7
    VARCHAR = 0xA7  # BIGVARCHAR
    VARBINARY = 0xA5  # BIGVARBINARY
    NCHAR = 0xEF
    CHAR = 0xAF
    BINARY = 0xAD


@dataclass(frozen=True)
class SqlType:
    """A SQL Server type as it appears in TYPE_INFO.

    ``size`` is the byte size for INTN/FLTN/BITN/GUID/DATETIMN, the maximum length in *bytes* for
    the character and binary types (``None`` for ``MAX``), unused otherwise.
    """

    kind: Kind
    size: int | None = 4
    precision: int = 18
    scale: int = 0

    @property
    def is_plp(self) -> bool:
        return self.kind in _VARLEN16 and self.size is None

    def type_info(self) -> bytes:
        k = self.kind
        if k in (Kind.INT, Kind.BIT, Kind.FLOAT, Kind.GUID, Kind.DATETIME):
            return bytes([k, self.size or 0])
        if k == Kind.DECIMAL:
            return bytes([k, _decimal_size(self.precision), self.precision, self.scale])
        if k == Kind.DATE:
            return bytes([k])
        if k in (Kind.TIME, Kind.DATETIME2, Kind.DATETIMEOFFSET):
            return bytes([k, self.scale])
        size = 0xFFFF if self.size is None else self.size
        info = bytes([k]) + struct.pack("<H", size)
        if k in _CHARACTER:
            info += COLLATION
        return info

    def sql_name(self) -> str:
        names = {
            Kind.BIT: "bit",
            Kind.FLOAT: "float" if self.size == 8 else "real",
            Kind.GUID: "uniqueidentifier",
            Kind.DATE: "date",
            Kind.DATETIME: "datetime",
        }
        if self.kind == Kind.INT:
            return {1: "tinyint", 2: "smallint", 4: "int", 8: "bigint"}[self.size or 4]
        if self.kind in names:
            return names[self.kind]
        if self.kind == Kind.DECIMAL:
            return f"decimal({self.precision},{self.scale})"
        if self.kind in (Kind.TIME, Kind.DATETIME2, Kind.DATETIMEOFFSET):
            return f"{self.kind.name.lower()}({self.scale})"
        length = (
            "max"
            if self.size is None
            else str(self.size // 2 if self.kind in (Kind.NVARCHAR, Kind.NCHAR) else self.size)
        )
        return f"{self.kind.name.lower()}({length})"


_CHARACTER = {Kind.NVARCHAR, Kind.VARCHAR, Kind.NCHAR, Kind.CHAR}
_VARLEN16 = _CHARACTER | {Kind.VARBINARY, Kind.BINARY}

INT = SqlType(Kind.INT, 4)
BIGINT = SqlType(Kind.INT, 8)
BIT = SqlType(Kind.BIT, 1)
FLOAT = SqlType(Kind.FLOAT, 8)
NVARCHAR_MAX = SqlType(Kind.NVARCHAR, None)


def nvarchar(chars: int | None) -> SqlType:
    if chars is None or chars > 4000:
        return NVARCHAR_MAX
    return SqlType(Kind.NVARCHAR, max(chars, 1) * 2)


def _decimal_size(precision: int) -> int:
    if precision <= 9:
        return 5
    if precision <= 19:
        return 9
    if precision <= 28:
        return 13
    return 17


def _time_bytes(scale: int) -> int:
    return 3 if scale <= 2 else 4 if scale <= 4 else 5


def _encode_time(value: dt.time, scale: int) -> bytes:
    seconds = value.hour * 3600 + value.minute * 60 + value.second
    units: int = (seconds * 10**7 + value.microsecond * 10) // 10 ** (7 - scale)
    return units.to_bytes(_time_bytes(scale), "little")


def _encode_date(value: dt.date) -> bytes:
    return (value - _DATE_EPOCH).days.to_bytes(3, "little")


def _plp(data: bytes) -> bytes:
    out = struct.pack("<Q", len(data))
    if data:
        out += struct.pack("<I", len(data)) + data
    return out + struct.pack("<I", 0)


def encode_value(sql_type: SqlType, value: Any) -> bytes:
    """A value as it appears in a ROW or RETURNVALUE token (``None`` is NULL)."""
    k = sql_type.kind
    if k in _VARLEN16:
        if value is None:
            return struct.pack("<Q", PLP_NULL) if sql_type.is_plp else b"\xff\xff"
        if k in (Kind.VARBINARY, Kind.BINARY):
            data = bytes(value)
        elif k in (Kind.VARCHAR, Kind.CHAR):
            data = str(value).encode("cp1252", errors="replace")
        else:
            data = str(value).encode("utf-16-le")
        if sql_type.is_plp:
            return _plp(data)
        return struct.pack("<H", len(data)) + data
    if value is None:
        return b"\x00"
    if k == Kind.INT:
        size = sql_type.size or 4
        return bytes([size]) + int(value).to_bytes(size, "little", signed=size != 1)
    if k == Kind.BIT:
        return b"\x01" + (b"\x01" if value else b"\x00")
    if k == Kind.FLOAT:
        return b"\x08" + struct.pack("<d", float(value))
    if k == Kind.GUID:
        return b"\x10" + uuid.UUID(str(value)).bytes_le
    if k == Kind.DECIMAL:
        size = _decimal_size(sql_type.precision)
        quantum = decimal.Decimal(1).scaleb(-sql_type.scale)
        scaled = int(decimal.Decimal(str(value)).quantize(quantum).scaleb(sql_type.scale))
        sign = b"\x01" if scaled >= 0 else b"\x00"
        return bytes([size]) + sign + abs(scaled).to_bytes(size - 1, "little")
    if k == Kind.DATE:
        return b"\x03" + _encode_date(_as_datetime(value).date())
    if k == Kind.TIME:
        data = _encode_time(_as_datetime(value).time(), sql_type.scale)
        return bytes([len(data)]) + data
    if k == Kind.DATETIME2:
        moment = _as_datetime(value)
        data = _encode_time(moment.time(), sql_type.scale) + _encode_date(moment.date())
        return bytes([len(data)]) + data
    if k == Kind.DATETIME:
        moment = _as_datetime(value)
        days = (moment.date() - dt.date(1900, 1, 1)).days
        secs = moment.hour * 3600 + moment.minute * 60 + moment.second
        ticks = secs * 300 + round(moment.microsecond * 300 / 1_000_000)
        return b"\x08" + struct.pack("<iI", days, ticks)
    raise ProtocolError(f"cannot encode values of type {k.name}")


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    if isinstance(value, dt.time):
        return dt.datetime.combine(_DATE_EPOCH, value)
    text = str(value).strip()
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return dt.datetime.combine(_DATE_EPOCH, dt.time.fromisoformat(text))


def decode_type_info(reader: Reader) -> SqlType:
    """TYPE_INFO of an RPC parameter; fixed-length types are mapped onto their nullable forms."""
    code = reader.u8()
    fixed = {
        0x30: (Kind.INT, 1),
        0x34: (Kind.INT, 2),
        0x38: (Kind.INT, 4),
        0x7F: (Kind.INT, 8),
        0x32: (Kind.BIT, 1),
        0x3E: (Kind.FLOAT, 8),
        0x3B: (Kind.FLOAT, 4),
        0x3D: (Kind.DATETIME, 8),
    }
    if code in fixed:
        kind, size = fixed[code]
        return SqlType(kind, size, precision=-1)  # precision -1 marks "fixed length on the wire"
    if code in (0x26, 0x68, 0x6D, 0x24, 0x6F):
        return SqlType(Kind(code), reader.u8())
    if code in (0x6A, 0x6C):
        reader.u8()
        precision, scale = reader.u8(), reader.u8()
        return SqlType(Kind.DECIMAL, None, precision, scale)
    if code == 0x28:
        return SqlType(Kind.DATE, 3)
    if code in (0x29, 0x2A, 0x2B):
        return SqlType(Kind(code), None, scale=reader.u8())
    if code in (0xE7, 0xA7, 0xEF, 0xAF, 0xA5, 0xAD):
        size = reader.u16()
        if code in (0xE7, 0xA7, 0xEF, 0xAF):
            reader.take(5)
        return SqlType(Kind(code), None if size == 0xFFFF else size)
    raise ProtocolError(f"unsupported parameter type 0x{code:02x}")


def _read_plp(reader: Reader) -> bytes | None:
    total = reader.u64()
    if total == PLP_NULL:
        return None
    out = bytearray()
    while True:
        chunk = reader.u32()
        if chunk == 0:
            return bytes(out)
        out += reader.take(chunk)


def decode_value(reader: Reader, sql_type: SqlType) -> Any:
    k = sql_type.kind
    if k in _VARLEN16:
        if sql_type.is_plp:
            data = _read_plp(reader)
        else:
            length = reader.u16()
            data = None if length == 0xFFFF else reader.take(length)
        if data is None:
            return None
        if k in (Kind.VARBINARY, Kind.BINARY):
            return data
        if k in (Kind.VARCHAR, Kind.CHAR):
            return data.decode("cp1252", errors="replace")
        return data.decode("utf-16-le", errors="replace")
    length = (sql_type.size or 0) if sql_type.precision == -1 else reader.u8()
    if not length:
        return None
    data = reader.take(length)
    if k == Kind.INT:
        return int.from_bytes(data, "little", signed=length != 1)
    if k == Kind.BIT:
        return bool(data[0])
    if k == Kind.FLOAT:
        return struct.unpack("<d" if length == 8 else "<f", data)[0]
    if k == Kind.GUID:
        return str(uuid.UUID(bytes_le=data)).upper()
    if k == Kind.DECIMAL:
        magnitude = int.from_bytes(data[1:], "little")
        return decimal.Decimal(magnitude if data[0] else -magnitude).scaleb(-sql_type.scale)
    if k == Kind.DATE:
        return _DATE_EPOCH + dt.timedelta(days=int.from_bytes(data, "little"))
    if k in (Kind.TIME, Kind.DATETIME2, Kind.DATETIMEOFFSET):
        tlen = _time_bytes(sql_type.scale)
        units = int.from_bytes(data[:tlen], "little") * 10 ** (7 - sql_type.scale)
        clock = (dt.datetime.min + dt.timedelta(microseconds=units // 10)).time()
        if k == Kind.TIME:
            return clock
        day = _DATE_EPOCH + dt.timedelta(days=int.from_bytes(data[tlen : tlen + 3], "little"))
        moment = dt.datetime.combine(day, clock)
        if k == Kind.DATETIMEOFFSET:
            offset = struct.unpack("<h", data[tlen + 3 : tlen + 5])[0]
            moment = (moment + dt.timedelta(minutes=offset)).replace(
                tzinfo=dt.timezone(dt.timedelta(minutes=offset))
            )
        return moment
    if k == Kind.DATETIME:
        if length == 4:
            days, minutes = struct.unpack("<HH", data)
            return dt.datetime(1900, 1, 1) + dt.timedelta(days=days, minutes=minutes)
        days, ticks = struct.unpack("<iI", data)
        return dt.datetime(1900, 1, 1) + dt.timedelta(days=days, milliseconds=ticks * 10 / 3)
    raise ProtocolError(f"cannot decode values of type {k.name}")


# --- RPC -----------------------------------------------------------------------------------------


class ProcId(IntEnum):
    SP_CURSOR = 1
    SP_EXECUTESQL = 10
    SP_PREPARE = 11
    SP_EXECUTE = 12
    SP_PREPEXEC = 13
    SP_UNPREPARE = 15


@dataclass
class RpcParam:
    name: str
    output: bool
    sql_type: SqlType
    value: Any


@dataclass
class RpcCall:
    name: str  # "" when called by ProcID
    proc_id: int | None
    params: list[RpcParam]


def parse_rpc(payload: bytes) -> list[RpcCall]:
    """Every call of an RPC request (batched calls are separated by 0x80 or 0xFF)."""
    reader = Reader(payload, skip_all_headers(payload))
    calls: list[RpcCall] = []
    while reader.remaining() > 0:
        name_len = reader.u16()
        if name_len == 0xFFFF:
            name, proc_id = "", reader.u16()
        else:
            name, proc_id = reader.take(2 * name_len).decode("utf-16-le"), None
        reader.u16()  # option flags
        params: list[RpcParam] = []
        while reader.remaining() > 0 and reader.data[reader.pos] not in (0x80, 0xFF, 0xFE):
            pname = reader.b_varchar()
            status = reader.u8()
            sql_type = decode_type_info(reader)
            params.append(
                RpcParam(pname, bool(status & 0x01), sql_type, decode_value(reader, sql_type))
            )
        calls.append(RpcCall(name, proc_id, params))
        if reader.remaining() > 0:
            reader.u8()  # batch separator
    return calls


# --- response tokens -----------------------------------------------------------------------------


class Token(IntEnum):
    COLMETADATA = 0x81
    ERROR = 0xAA
    INFO = 0xAB
    RETURNVALUE = 0xAC
    LOGINACK = 0xAD
    FEATUREEXTACK = 0xAE
    FEDAUTHINFO = 0xEE
    ROW = 0xD1
    ENVCHANGE = 0xE3
    DONE = 0xFD
    DONEPROC = 0xFE
    DONEINPROC = 0xFF
    RETURNSTATUS = 0x79


class EnvChange(IntEnum):
    DATABASE = 1
    LANGUAGE = 2
    PACKET_SIZE = 4
    COLLATION = 7
    BEGIN_TRAN = 8
    COMMIT_TRAN = 9
    ROLLBACK_TRAN = 10


DONE_FINAL = 0x00
DONE_MORE = 0x01
DONE_ERROR = 0x02
DONE_COUNT = 0x10
DONE_ATTN = 0x20


class CurCmd(IntEnum):
    NONE = 0
    SELECT = 0xC1
    INSERT = 0xC3
    DELETE = 0xC4
    UPDATE = 0xC5
    CREATE_TABLE = 0xC6
    DROP_TABLE = 0xC7
    BEGIN_TRAN = 0xD4
    COMMIT_TRAN = 0xD5
    ROLLBACK_TRAN = 0xD6
    EXECUTE = 0xE0


def env_change_text(kind: int, new: str, old: str) -> bytes:
    body = bytes([kind]) + b_varchar(new) + b_varchar(old)
    return bytes([Token.ENVCHANGE]) + struct.pack("<H", len(body)) + body


def env_change_bytes(kind: int, new: bytes, old: bytes) -> bytes:
    body = bytes([kind, len(new)]) + new + bytes([len(old)]) + old
    return bytes([Token.ENVCHANGE]) + struct.pack("<H", len(body)) + body


def message(
    token: int,
    number: int,
    state: int,
    severity: int,
    text: str,
    server: str,
    procedure: str = "",
    line: int = 1,
) -> bytes:
    body = (
        struct.pack("<IBB", number, state, severity)
        + us_varchar(text)
        + b_varchar(server)
        + b_varchar(procedure)
        + struct.pack("<I", line)
    )
    return bytes([token]) + struct.pack("<H", len(body)) + body


def login_ack(program: str = "Microsoft SQL Server", version: bytes = b"\x0c\x00\x07\xd0") -> bytes:
    body = b"\x01" + struct.pack(">I", TDS_VERSION_74) + b_varchar(program) + version
    return bytes([Token.LOGINACK]) + struct.pack("<H", len(body)) + body


def feature_ext_ack_fedauth() -> bytes:
    # FEDAUTH acknowledged with no data (security-token library), then the terminator.
    return bytes([Token.FEATUREEXTACK, FEATURE_FEDAUTH, 0, 0, 0, 0, FEATURE_TERMINATOR])


class FedAuthInfoId(IntEnum):
    STSURL = 0x01
    SPN = 0x02


def fedauth_info(sts_url: str, spn: str) -> bytes:
    """The FEDAUTHINFO token ([MS-TDS] 2.2.7.12): where the client gets a token, and for what.

    ``TokenLength u32 | CountOfInfoIDs u32 | {id u8, DataLen u32, DataOffset u32}* | data``; each
    offset counts from CountOfInfoIDs, the data are UTF-16LE strings.
    """
    # SPN first, then the STS URL: the order Azure SQL sends them in.
    items = [
        (FedAuthInfoId.SPN, spn.encode("utf-16-le")),
        (FedAuthInfoId.STSURL, sts_url.encode("utf-16-le")),
    ]
    offset = 4 + 9 * len(items)
    table, data = bytearray(), bytearray()
    for info_id, value in items:
        table += struct.pack("<BII", info_id, len(value), offset + len(data))
        data += value
    body = struct.pack("<I", len(items)) + bytes(table) + bytes(data)
    return bytes([Token.FEDAUTHINFO]) + struct.pack("<I", len(body)) + body


def done(status: int, curcmd: int = 0, rowcount: int = 0, token: int = Token.DONE) -> bytes:
    return bytes([token]) + struct.pack("<HHQ", status, curcmd, rowcount)


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: SqlType
    nullable: bool = True


def col_metadata(columns: Sequence[Column]) -> bytes:
    out = bytearray([Token.COLMETADATA]) + struct.pack("<H", len(columns))
    for col in columns:
        flags = 0x01 if col.nullable else 0x00
        out += struct.pack("<IH", 0, flags) + col.sql_type.type_info() + b_varchar(col.name)
    return bytes(out)


def row(columns: Sequence[Column], values: Sequence[Any]) -> bytes:
    out = bytearray([Token.ROW])
    for col, value in zip(columns, values, strict=True):
        out += encode_value(col.sql_type, value)
    return bytes(out)


def return_status(value: int) -> bytes:
    return bytes([Token.RETURNSTATUS]) + struct.pack("<i", value)


def return_value(ordinal: int, name: str, sql_type: SqlType, value: Any) -> bytes:
    return (
        bytes([Token.RETURNVALUE])
        + struct.pack("<H", ordinal)
        + b_varchar(name)
        + b"\x01"
        + struct.pack("<IH", 0, 0x01)
        + sql_type.type_info()
        + encode_value(sql_type, value)
    )
