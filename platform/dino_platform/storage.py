"""One storage layer for every location the platform reads or writes.

A location is a URI: a local path or ``file:///abs/path`` (the embedded default), or
``s3://bucket/prefix``. S3 settings are resolved as the AWS CLI resolves them (botocore: ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_PROFILE``, ``AWS_MAX_ATTEMPTS``, the credential variables and the shared config files),
so MinIO, Ceph or a test endpoint work by setting the endpoint. All I/O goes through a ``pyarrow.fs.FileSystem``,
the object Ray Data and Ray Train use too; transient S3 errors (throttling, 5xx, dropped connections) are
retried up to ``max_attempts`` times with backoff, by the AWS SDK inside pyarrow and by botocore's standard
retry mode for whole-object reads (:meth:`S3Settings.client`).

What travels to Ray tasks, Ray Data read tasks and Ray Train workers is the :class:`S3Settings`,
not a pyarrow ``S3FileSystem``: that one pickles without its retry strategy (``fs.__reduce__()``
keeps the timeouts, not ``retry_strategy``), so a worker would fall back to pyarrow's 3 attempts.
The filesystem of an S3 location is a ``pyarrow.fs.PyFileSystem`` over a handler that pickles as
its settings and rebuilds the native ``S3FileSystem`` (retries and timeouts included) in the
process that unpickles it.

Usage::

    loc = resolve("s3://bucket/datasets/coco")
    loc.child("manifest.json").write_bytes(data)       # atomic: complete object or nothing
    names = loc.list_files()                           # relative paths, sorted
    ray.data.read_parquet(loc.path, filesystem=loc.fs)

Every failure surfaces as :class:`StorageError` (or :class:`StorageNotFoundError`) naming the URI
and what to check. Credentials never appear in messages or logs.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dino_platform.errors import StorageError

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 120.0


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The URI names an object or directory that does not exist."""


@dataclass(frozen=True)
class S3Settings:
    """S3 connection settings as botocore resolved them (secrets are kept out of ``repr``)."""

    endpoint_url: Optional[str]          # None: AWS itself
    region: Optional[str]
    max_attempts: int
    credential_source: str               # e.g. "env", "shared-credentials-file", "anonymous"
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)

    def filesystem(self) -> pafs.FileSystem:
        """The filesystem for these settings; it pickles as the settings (see the module docstring)."""
        return pafs.PyFileSystem(S3SettingsHandler(self))

    @functools.lru_cache(maxsize=16)
    def native_filesystem(self) -> pafs.S3FileSystem:
        """pyarrow's ``S3FileSystem`` for these settings, one per process (do not ship it to Ray)."""
        return pafs.S3FileSystem(**self._native_kwargs())

    def client(self):
        """A boto3 S3 client that retries and times out like :meth:`filesystem` does."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S)
        credentials = {}
        if self.access_key:
            credentials = dict(aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                               aws_session_token=self.session_token)
        else:
            from botocore import UNSIGNED
            config = config.merge(Config(signature_version=UNSIGNED))
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                              config=config, **credentials)

    def _native_kwargs(self) -> dict:
        kwargs = dict(
            region=self.region,
            # NOTE: not AwsStandardS3RetryStrategy: its retry quota (500 tokens, 5 per retry) is
            # not refilled by successes inside pyarrow, so after ~100 retries in a process every
            # fault is final (measured at 30% faults: 206 of 300 write+read pairs failed with it,
            # none with this one and read_bytes through boto3). The default strategy has no quota;
            # its argument counts retries, AWS_MAX_ATTEMPTS counts attempts.
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=max(0, self.max_attempts - 1)),
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=REQUEST_TIMEOUT_S,
        )
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"),
                          scheme=parsed.scheme or "https")
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key,
                          session_token=self.session_token)
        else:
            kwargs.update(anonymous=True)
        return kwargs

    def redact(self, text: str) -> str:
        """``text`` with any credential value replaced by ``***``."""
        for secret in (self.secret_key, self.session_token, self.access_key):
            if secret:
                text = text.replace(secret, "***")
        return text


@functools.lru_cache(maxsize=16)
def _s3_client(settings: S3Settings):
    # botocore's DEBUG records carry the signed request headers (the access key id): unless the
    # user chose a level for it, a DEBUG run of the platform does not log them.
    botocore_log = logging.getLogger("botocore")
    if botocore_log.level == logging.NOTSET:
        botocore_log.setLevel(logging.INFO)
    return settings.client()  # boto3 clients are thread-safe; one per process and settings


def _forward(name: str):
    """A handler method that calls the native filesystem's method of the same name with the same arguments."""
    return lambda self, *args: getattr(self.fs, name)(*args)


class S3SettingsHandler(pafs.FileSystemHandler):
    """:meth:`S3Settings.native_filesystem` behind a ``PyFileSystem``, pickled as its settings (module docstring).

    Streams and files come from the native filesystem, so the bytes never pass through Python."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.fs = settings.native_filesystem()

    def __reduce__(self):
        return (S3SettingsHandler, (self.settings,))

    def __eq__(self, other) -> bool:
        return isinstance(other, S3SettingsHandler) and other.settings == self.settings

    def get_type_name(self) -> str:
        return "dino-s3"

    normalize_path = _forward("normalize_path")
    get_file_info = _forward("get_file_info")
    get_file_info_selector = _forward("get_file_info")
    delete_dir = _forward("delete_dir")
    delete_file = _forward("delete_file")
    move = _forward("move")
    copy_file = _forward("copy_file")
    open_input_stream = _forward("open_input_stream")
    open_input_file = _forward("open_input_file")

    # the native methods take these arguments by keyword (positionally they would be others)
    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def s3_settings() -> S3Settings:
    """Resolve S3 settings from the environment and AWS config files, like the AWS CLI does."""
    # cached per process, keyed by the AWS_* variables: a changed one (tests, a new profile) re-resolves
    return _resolve_s3_settings(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


@functools.lru_cache(maxsize=8)
def _resolve_s3_settings(_env_key: Tuple[Tuple[str, str], ...]) -> S3Settings:
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        session = botocore.session.Session()
        client = session.create_client("s3")
        credentials = session.get_credentials()
    except BotoCoreError as exc:  # e.g. a profile named in AWS_PROFILE that does not exist
        raise StorageError(f"cannot resolve S3 settings: {exc}; check AWS_PROFILE and "
                           "~/.aws/config") from None
    endpoint = client.meta.endpoint_url
    if urlparse(endpoint).hostname and urlparse(endpoint).hostname.endswith("amazonaws.com"):
        endpoint = None  # let the SDK pick the regional AWS endpoint
    max_attempts = session.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS
    if credentials is None:
        return S3Settings(endpoint, client.meta.region_name, int(max_attempts), "anonymous")
    frozen = credentials.get_frozen_credentials()
    settings = S3Settings(endpoint, client.meta.region_name, int(max_attempts),
                          credentials.method, frozen.access_key, frozen.secret_key, frozen.token)
    log.debug("S3 settings: %r", settings)  # repr hides the credential values
    return settings


@dataclass(frozen=True)
class Location:
    """A resolved storage location: the URI a user gave, plus the filesystem and path to reach it.

    Ray tasks receive it as is: it pickles as its URI, path and settings (``fs`` is rebuilt from them, see
    the module docstring). ``path`` is what ``fs`` understands: ``bucket/key`` on S3, else an absolute path.
    """

    uri: str
    fs: pafs.FileSystem = field(repr=False, compare=False)
    path: str
    settings: Optional[S3Settings] = field(default=None, repr=False, compare=False)

    def __reduce__(self):
        return (_rebuild_location, (self.uri, self.path, self.settings))

    @property
    def is_s3(self) -> bool:
        return self.settings is not None

    def child(self, relative: str) -> "Location":
        """The location ``relative`` (a '/'-separated path) below this one."""
        relative = relative.strip("/")
        return Location(f"{self.uri.rstrip('/')}/{relative}", self.fs,
                        posixpath.join(self.path, relative) if self.is_s3
                        else os.path.join(self.path, *relative.split("/")), self.settings)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    # --- reading ---------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        if self.is_s3:
            # NOTE: whole objects are read with boto3, not pyarrow. pyarrow's ranged GET writes the
            # response into a buffer of the object's size, so an error reply longer than a small
            # object (a 250-byte SlowDown for a 100-byte JSON marker) breaks the stream and the SDK
            # gives up without retrying. botocore retries it like any other throttled request.
            with self._boto_read_errors():
                return self._s3_body().read()
        with self._errors("read"):
            with self.fs.open_input_file(self.path) as stream:
                return stream.read()

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes in chunks of at most ``chunk_size``: a streamed read that never holds
        the whole object (an S3 object is fetched as it is consumed)."""
        if self.is_s3:  # one boto3 GET streamed from its body, for the reason in read_bytes
            with self._boto_read_errors():
                yield from self._s3_body().iter_chunks(chunk_size)
            return
        with self._errors("read"):
            with self.fs.open_input_stream(self.path) as stream:
                yield from iter(lambda: stream.read(chunk_size), b"")

    def _s3_body(self):
        bucket, _, key = self.path.partition("/")
        return _s3_client(self.settings).get_object(Bucket=bucket, Key=key)["Body"]

    @contextlib.contextmanager
    def _boto_read_errors(self) -> Iterator[None]:
        """botocore's errors of a read, as this module's StorageError / StorageNotFoundError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageNotFoundError(f"{self.uri}: does not exist") from None
            raise StorageError(self._explain("read", OSError(f"{code}: {exc}"))) from None
        except (BotoCoreError, OSError) as exc:
            raise StorageError(self._explain("read", OSError(f"{type(exc).__name__}: {exc}"))) from None

    def exists(self) -> bool:
        with self._errors("check"):
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        with self._errors("check"):
            return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        with self._errors("stat"):
            info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise StorageNotFoundError(f"{self.uri}: does not exist")
        return int(info.size)

    def list_files(self, recursive: bool = True) -> List[str]:
        """Paths of the files below this location, relative to it, '/'-separated, sorted (:meth:`file_sizes`)."""
        return sorted(self.file_sizes(recursive))

    def file_sizes(self, recursive: bool = True) -> Dict[str, int]:
        """{path relative to this location: size in bytes} of the files below it, from one listing.

        A location that does not exist lists as empty (S3 has no directories to be missing); a missing
        bucket is an error."""
        with self._errors("list"):
            infos = self.fs.get_file_info(
                pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
            if not infos and self.is_s3:
                bucket = self.path.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError(f"cannot list {self.uri}: the bucket {bucket!r} does not "
                                       "exist; create it or fix the URI")
        posix = (lambda path: path) if self.is_s3 else (lambda path: path.replace(os.sep, "/"))
        base = posix(self.path.rstrip("/") + "/")
        files = {posix(info.path): int(info.size) for info in infos if info.type == pafs.FileType.File}
        return {path[len(base):]: size for path, size in files.items() if path.startswith(base)}

    def subdirectories(self) -> List[str]:
        """Names of the directories (S3: common prefixes) directly below this location, sorted."""
        with self._errors("list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        return sorted(posixpath.basename(info.path.replace(os.sep, "/").rstrip("/")) for info in infos
                      if info.type == pafs.FileType.Directory)

    # --- writing ---------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` so that readers see the complete object or the previous state, never part.

        Local files: written to a temporary name in the same directory, then renamed (atomic on
        POSIX). S3: one upload from memory; S3 makes an object visible only once it is complete.
        """
        with self._errors("write"):
            if self.is_s3:
                with self.fs.open_output_stream(self.path) as stream:
                    stream.write(data)
                return
            directory = os.path.dirname(self.path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def delete(self) -> None:
        """Remove the file or directory (with its contents); a missing one is no error."""
        with self._errors("delete"):
            kind = self.fs.get_file_info(self.path).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif kind != pafs.FileType.NotFound:
                self.fs.delete_file(self.path)

    def ensure_dir(self) -> None:
        """Create the directory (a no-op on S3, where prefixes need no creation)."""
        if not self.is_s3:
            with self._errors("create"):
                os.makedirs(self.path, exist_ok=True)

    # --- errors ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            raise StorageNotFoundError(f"{self.uri}: does not exist") from None
        except OSError as exc:
            raise StorageError(self._explain(action, exc)) from None

    def _explain(self, action: str, exc: OSError) -> str:
        detail = str(exc)
        if not self.is_s3:
            return f"cannot {action} {self.uri}: {detail}"
        settings = self.settings
        endpoint = settings.endpoint_url or f"AWS S3 (region {settings.region or 'auto'})"
        def mentions(*texts: str) -> bool:
            return any(text in detail for text in texts)

        if mentions("NETWORK_CONNECTION", "Could not connect", "curlCode", "EndpointConnectionError",
                    "ConnectionClosedError"):
            hint = (f"cannot reach the S3 endpoint {endpoint} after {settings.max_attempts} attempts; "
                    "check that it is running and that AWS_ENDPOINT_URL names it")
        elif mentions("SLOW_DOWN", "SlowDown", "INTERNAL_FAILURE", "InternalError", "SERVICE_UNAVAILABLE",
                      "ServiceUnavailable", "HTTP response code: 5"):
            hint = (f"the S3 endpoint {endpoint} kept failing (throttling or server errors) for "
                    f"{settings.max_attempts} attempts; retry later or raise AWS_MAX_ATTEMPTS")
        elif mentions("NO_SUCH_BUCKET", "NoSuchBucket"):
            hint = "the bucket does not exist; create it or fix the URI"
        elif mentions("ACCESS_DENIED", "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = (f"access denied by {endpoint}; check the credentials "
                    f"(source: {settings.credential_source}; AWS_ACCESS_KEY_ID / AWS_PROFILE)")
        else:
            hint = f"endpoint {endpoint}; check AWS_ENDPOINT_URL, AWS_REGION and the credentials"
        return settings.redact(f"cannot {action} {self.uri}: {hint} ({detail})")


DINO_HOME_DEFAULT = "~/.dino"


def in_submitted_ray_job() -> bool:
    """True in the driver of a job started by ``ray job submit`` (its working directory is Ray's
    temporary copy of the uploaded one: ``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) or \
        f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}" in os.getcwd() + os.sep


def dino_home() -> str:
    """``$DINO_HOME``, default ``~/.dino``: where relative output roots of submitted jobs go."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DINO_HOME") or DINO_HOME_DEFAULT))


def output_root(uri: str) -> str:
    """The URI an output root ``uri`` names, made absolute where it is a local path.

    A relative local path is relative to the working directory, except in a submitted Ray job:
    there the working directory is a cache Ray may evict, and its name changes with every edit of
    the uploaded files, so a relative root goes under :func:`dino_home` instead and the next
    submit finds the earlier run.
    """
    if "://" in uri:
        return uri
    expanded = os.path.expanduser(uri)
    if not os.path.isabs(expanded) and in_submitted_ray_job():
        return os.path.normpath(os.path.join(dino_home(), expanded))
    return os.path.abspath(expanded)


def _rebuild_location(uri: str, path: str, settings: Optional[S3Settings]) -> Location:
    fs = settings.filesystem() if settings is not None else pafs.LocalFileSystem()
    return Location(uri, fs, path, settings)


def resolve(uri: str) -> Location:
    """Turn a URI (local path, ``file://``, ``s3://``) into a :class:`Location`.

    Relative local paths are made absolute here, so a Location can travel to a Ray worker whose
    working directory differs.
    """
    if not uri:
        raise StorageError("empty storage URI; give a local path, file:///path or s3://bucket/prefix")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
        settings = s3_settings()
        path = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        return Location(uri.rstrip("/"), settings.filesystem(), path, settings)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must be absolute (file:///path)")
        local = parsed.path
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        local = uri
    else:
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    local = os.path.abspath(os.path.expanduser(local))
    return Location(local, pafs.LocalFileSystem(), local)
