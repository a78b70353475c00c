"""Reliability regressions from issue 12: the tuner writes only files that are ours, a hostile tuning cache never
breaks a call, tuned sizes cannot exhaust memory, huge HYPER_LAYERS ranges cost nothing, and an unwritable cache
is refused before tuning.

Each test here failed on the code the issue was filed against."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import hyper_backend
from hyper_backend.autotune import schema, store, writer
from hyper_backend.autotune.cli import main
from hyper_backend.config import EnvError, LayerSelection, read_env

pytestmark = pytest.mark.usefixtures("lsh_detector")  # written for the LSH estimator: conftest.py

CPU = torch.device("cpu")
DEV = schema.device_key(CPU)


def _entry(n=64, causal=False, head_dim=16, **params):
    params = {"block_size": 32, "sample_size": 16, "lsh_num_projs": 4, "min_seq_len": 32, **params}
    return schema.make_entry(
        device=DEV,
        dtype="float32",
        head_dim=head_dim,
        causal=causal,
        seq_len=n,
        params=params,
        tuned={"seq_len": n, "time_s": 1.0, "error": 0.1},
    )


def _cache_text(entries=None, defaults=None, version=schema.VERSION):
    return json.dumps(
        {"schema": schema.SCHEMA, "version": version, "entries": entries or {}, "defaults": defaults or {}}
    )


def _raw_entry(**fields):
    e = {
        "device": DEV,
        "dtype": "float32",
        "head_dim": 16,
        "causal": False,
        "bucket": 64,
        "params": {"block_size": 32, "min_seq_len": 32},
        "tuned": {},
    }
    e.update(fields)
    return e


class _Hung(BaseException):
    """Raised by `_deadline`; a BaseException so that no ``except OSError``/``except Exception`` swallows it."""


@contextlib.contextmanager
def _deadline(seconds):
    """Fail instead of hanging (the old tuner blocked forever opening a FIFO). Main thread only."""

    def expired(*_):
        raise _Hung(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@contextlib.contextmanager
def _umask(mask):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _snapshot(directory):
    """Every name under ``directory`` with its type and content (or link target), to prove nothing changed."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[p] = ("file", f.read(), stat.S_IMODE(st.st_mode))
            else:
                out[p] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


# ----------------------------------------------------------------------------------------------------------
# item 1: the tuner writes only a regular file that is ours
# ----------------------------------------------------------------------------------------------------------


def _make(kind, path):
    """Something at ``path`` that is not ours."""
    if kind == "text file":
        with open(path, "w") as f:
            f.write("my notes, not a cache\n")
    elif kind == "directory":
        os.mkdir(path)
        with open(os.path.join(path, "inside.txt"), "w") as f:
            f.write("keep me")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "foreign json":
        with open(path, "w") as f:
            json.dump({"name": "someone else's settings", "entries": {}}, f)
    elif kind == "json list":
        with open(path, "w") as f:
            json.dump([1, 2, 3], f)
    elif kind == "binary":
        with open(path, "wb") as f:
            f.write(bytes(range(256)))
    elif kind == "deep json":
        with open(path, "w") as f:
            f.write("[" * 200_000 + "]" * 200_000)
    elif kind == "symlink to a text file":
        _make("text file", path + ".target")
        os.symlink(os.path.basename(path) + ".target", path)
    else:
        raise AssertionError(kind)


NOT_OURS = [
    "text file",
    "directory",
    "fifo",
    "foreign json",
    "json list",
    "binary",
    "deep json",
    "symlink to a text file",
]


@pytest.fixture
def no_tuning(monkeypatch):
    """The CLI must refuse before the search runs: running it fails the test."""
    from hyper_backend.autotune import search

    def run(self):
        raise AssertionError("tuning started although the cache path must be refused first")

    monkeypatch.setattr(search.Tuner, "run", run)


_ARGV = ["--seq", "256", "--no-causal", "--time-budget", "3", "--head-dim", "16", "--no-crossover-check"]


@pytest.mark.parametrize("kind", NOT_OURS)
def test_cli_refuses_a_cache_path_that_is_not_ours_before_tuning(kind, tmp_path, no_tuning, capsys):
    path = str(tmp_path / "tune.json")
    _make(kind, path)
    before = _snapshot(tmp_path)
    with _deadline(60):
        code = main(_ARGV + ["--cache", path])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and path in lines[0] and "refusing" in lines[0], err
    assert _snapshot(tmp_path) == before  # nothing renamed, replaced, created or deleted


@pytest.mark.parametrize("kind", NOT_OURS)
def test_record_refuses_a_path_that_is_not_ours_and_touches_nothing(kind, tmp_path):
    path = str(tmp_path / "tune.json")
    _make(kind, path)
    before = _snapshot(tmp_path)
    with _deadline(60), pytest.raises(writer.CachePathError, match="refusing"):
        writer.record(path, [_entry()])
    with _deadline(60), pytest.raises(writer.CachePathError):
        writer.check_writable(path)
    assert _snapshot(tmp_path) == before


def test_real_tuner_run_on_a_text_file_exits_at_once_and_keeps_it(tmp_path):
    """The issue's exact repro, as a subprocess: exit non-zero in seconds with one line, file intact."""
    path = tmp_path / "notes.txt"
    path.write_text("precious\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyper_backend.autotune",
            "--seq",
            "256",
            "--no-causal",
            "--time-budget",
            "3",
            "--head-dim",
            "16",
            "--cache",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr, proc.stderr
    assert "screening" not in proc.stdout  # it did not tune
    assert path.read_text() == "precious\n" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_absent_and_empty_files_are_written(tmp_path):
    for name in ("absent.json", "empty.json"):
        path = str(tmp_path / name)
        if name == "empty.json":
            open(path, "w").close()
        writer.check_writable(path)
        writer.record(path, [_entry()])
        data = json.load(open(path))
        assert data["schema"] == schema.SCHEMA and len(data["entries"]) == 1


def test_symlinked_cache_updates_its_target_and_keeps_the_link(tmp_path):
    os.mkdir(tmp_path / "real")
    target = tmp_path / "real" / "tune.json"
    link = tmp_path / "link.json"
    os.symlink(target, link)  # dangling: the first write creates the target
    writer.record(str(link), [_entry(64)])
    assert os.path.islink(link) and os.readlink(link) == str(target)
    writer.record(str(link), [_entry(1024)])  # an existing target is updated in place of the link
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert len(json.load(open(target))["entries"]) == 2
    assert (
        store.lookup_tuned(str(link), device=CPU, dtype=torch.float32, head_dim=16, causal=False, seq_len=64)[
            "block_size"
        ]
        == 32
    )
    assert not [n for n in os.listdir(tmp_path) if n != "real" and n != "link.json"]


def test_new_cache_file_respects_the_umask_and_an_updated_one_keeps_its_mode(tmp_path):
    path = str(tmp_path / "tune.json")
    with _umask(0o027):
        writer.record(path, [_entry(64)])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chmod(path, 0o600)
    with _umask(0o022):
        writer.record(path, [_entry(1024)])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(json.load(open(path))["entries"]) == 2


def test_set_aside_never_overwrites_an_earlier_set_aside_file(tmp_path):
    path = str(tmp_path / "tune.json")
    with open(path + ".v99", "w") as f:
        f.write("an earlier set-aside file\n")
    contents = []
    for i in range(2):
        contents.append(_cache_text(entries={"x": {"n": i}}, version=99))
        with open(path, "w") as f:
            f.write(contents[-1])
        with pytest.warns(store.CacheWarning, match="kept as"):
            writer.record(path, [_entry()])
        assert json.load(open(path))["version"] == schema.VERSION
    assert open(path + ".v99").read() == "an earlier set-aside file\n"
    assert open(path + ".v99.1").read() == contents[0]
    assert open(path + ".v99.2").read() == contents[1]


def test_set_aside_name_stays_in_the_directory_whatever_the_version_says(tmp_path):
    os.mkdir(tmp_path / "d")
    path = str(tmp_path / "d" / "tune.json")
    bad_version = _cache_text(version="/../../escaped")
    with open(path, "w") as f:
        f.write(bad_version)
    with pytest.warns(store.CacheWarning):
        writer.record(path, [_entry()])
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert open(path + ".bad").read() == bad_version


def test_lock_path_that_is_not_a_regular_file_is_refused(tmp_path):
    path = str(tmp_path / "tune.json")
    os.mkfifo(path + ".lock")
    with _deadline(60), pytest.raises(writer.CachePathError, match="lock"):
        writer.record(path, [_entry()])
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------------------------------------
# item 10: an unwritable cache directory is refused before tuning
# ----------------------------------------------------------------------------------------------------------


def test_cli_refuses_an_unwritable_cache_directory_before_tuning(tmp_path, no_tuning, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    path = str(blocker / "sub" / "tune.json")
    code = main(_ARGV + ["--cache", path])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and path in lines[0] and "directory" in lines[0], err
    assert blocker.read_text() == "a file where the cache directory should be"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_cli_refuses_a_read_only_cache_directory_before_tuning(tmp_path, no_tuning, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = main(_ARGV + ["--cache", str(ro / "tune.json")])
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "not writable" in err


# ----------------------------------------------------------------------------------------------------------
# item 5: a hostile tuning cache warns and is ignored; calls still work
# ----------------------------------------------------------------------------------------------------------

HOSTILE = {
    "nested 200k deep": "[" * 200_000 + "]" * 200_000,
    "entries nested 200k deep": (
        '{"schema": "hyper_backend.tune", "version": 1, "entries": {"x": ' + "[" * 200_000 + "]" * 200_000 + "}}"
    ),
    "bucket of 5000 digits": _cache_text(entries={"x": "BIG"}).replace(
        '"BIG"', json.dumps(_raw_entry(bucket=0)).replace('"bucket": 0', '"bucket": ' + "9" * 5000)
    ),
    "sample_size of 5000 digits": _cache_text(entries={"x": "BIG"}).replace(
        '"BIG"',
        json.dumps(_raw_entry(params={"sample_size": 0})).replace('"sample_size": 0', '"sample_size": ' + "7" * 5000),
    ),
    "bucket 0": _cache_text(entries={"x": _raw_entry(bucket=0)}),
    "bucket -64": _cache_text(entries={"x": _raw_entry(bucket=-64)}),
    "bucket Infinity": _cache_text(entries={"x": "INF"}).replace(
        '"INF"', json.dumps(_raw_entry(bucket=1)).replace('"bucket": 1', '"bucket": Infinity')
    ),
    "bucket as text": _cache_text(entries={"x": _raw_entry(bucket="64")}),
    "bucket 2.5": _cache_text(entries={"x": _raw_entry(bucket=2.5)}),
    "head_dim as text": _cache_text(entries={"x": _raw_entry(head_dim="16")}),
    "tuned not an object": _cache_text(entries={"x": _raw_entry(tuned=[1])}),
    "entry not an object": _cache_text(entries={"x": 5}),
    "default min_seq_len 0": _cache_text(
        defaults={"d": {"device": DEV, "dtype": "float32", "head_dim": 16, "min_seq_len": 0}}
    ),
    "a fifo": None,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tuning_cache_warns_and_the_call_still_works(name, tmp_path, monkeypatch):
    path = str(tmp_path / "tune.json")
    if HOSTILE[name] is None:
        os.mkfifo(path)
    else:
        with open(path, "w") as f:
            f.write(HOSTILE[name])
    monkeypatch.setenv("HYPER_TUNE_CACHE", path)
    assert hyper_backend.config.default_tune_cache() == path
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=g) for _ in range(3))
    with _deadline(60), pytest.warns(store.CacheWarning):
        out = hyper_backend.hyper_attention(q, k, v)
    # the entry (min_seq_len 32) was ignored: n=64 is below the default min_seq_len, so attention is exact
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # the same file, looked up directly and described for `explain`: None, and no exception
    where = dict(device=CPU, dtype=torch.float32, head_dim=16, causal=False, seq_len=64)
    store._parsed.clear()
    with _deadline(60), pytest.warns(store.CacheWarning):
        assert store.lookup_tuned(path, **where) is None
    store._parsed.clear()
    with _deadline(60), pytest.warns(store.CacheWarning):
        assert store.describe_entry(path, **where) is None
    with _deadline(60), warnings.catch_warnings():
        warnings.simplefilter("error")  # parsed once per file version: no second warning, no exception
        assert store.lookup_tuned(path, **where) is None


def test_tuner_read_before_writing_survives_hostile_content(tmp_path):
    """The old tuner crashed after tuning on the big-integer file; now a file of our schema keeps its good
    entries, drops the bad ones with a warning (keeping the file as it was beside it: issue 18 item 11), and
    unreadable JSON is refused (not a crash)."""
    path = str(tmp_path / "tune.json")
    good = _raw_entry(bucket=1024)
    text = _cache_text(entries={"good": good, "big": "BIG", "zero": _raw_entry(bucket=0)}).replace(
        '"BIG"', json.dumps(_raw_entry(bucket=1)).replace('"bucket": 1', '"bucket": ' + "9" * 5000)
    )
    with open(path, "w") as f:
        f.write(text)
    with pytest.warns(store.CacheWarning, match="dropping 2 entries"):
        writer.record(path, [_entry(64)])
    data = json.load(open(path))
    assert sorted(e["bucket"] for e in data["entries"].values()) == [64, 1024]
    assert [n for n in os.listdir(tmp_path) if n.startswith("tune.json.") and n != "tune.json.lock"] == [
        "tune.json.rejected"
    ]
    assert open(path + ".rejected").read() == text

    deep = str(tmp_path / "deep.json")
    with open(deep, "w") as f:
        f.write(HOSTILE["entries nested 200k deep"])
    with pytest.raises(writer.CachePathError, match="nested too deeply"):
        writer.record(deep, [_entry()])
    assert open(deep).read() == HOSTILE["entries nested 200k deep"]


# ----------------------------------------------------------------------------------------------------------
# issue 18 item 10: `python -m hyper_backend.check` reads the cache as the backend does
# ----------------------------------------------------------------------------------------------------------

_BIG = "9" * 5000


def _hostile_for_check(kind, path):
    if kind == "fifo":
        os.mkfifo(path)
        return path
    if kind == "/dev/zero":
        return "/dev/zero"
    text = {
        "deep json": "[" * 200_000 + "]" * 200_000,
        "a 5000-digit integer": _BIG,
        "an entry with a 5000-digit bucket": _cache_text(entries={"x": "BIG"}).replace(
            '"BIG"', json.dumps(_raw_entry(bucket=1)).replace('"bucket": 1', '"bucket": ' + _BIG)
        ),
    }[kind]
    with open(path, "w") as f:
        f.write(text)
    return path


_CHECK_SAYS = {
    "fifo": "ignored: is a FIFO, not a regular file",
    "/dev/zero": "ignored: is a character device, not a regular file",
    "deep json": "ignored: is not JSON this module can read (nested too deeply)",
    "a 5000-digit integer": "ignored: holds JSON that is not a hyper_backend tuning cache",
    "an entry with a 5000-digit bucket": "0 tuned entries, 0 device defaults, 0 model calibrations; 1 ignored: "
    "entries 'x' (bucket must be an int",
}


@pytest.mark.parametrize("kind", sorted(_CHECK_SAYS))
def test_check_reports_a_hostile_tuning_cache_in_one_line(kind, tmp_path, monkeypatch):
    """It used to hang on a FIFO, read /dev/zero without limit, and end deep JSON and a 5000-digit integer in
    tracebacks: `check` now reads the cache with the store's reader and says what it found in one line."""
    from hyper_backend import check

    path = _hostile_for_check(kind, str(tmp_path / "tune.json"))
    for var in [v for v in os.environ if v.startswith("HYPER_") and v != "HYPER_DETECTOR"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HYPER_TUNE_CACHE", path)
    with _deadline(60), warnings.catch_warnings():
        warnings.simplefilter("error")  # a line in the report, not a warning
        report = check.check_env()
    (note,) = [note for var, _, _, note in report.rows if var == "HYPER_TUNE_CACHE"]
    assert note.startswith(_CHECK_SAYS[kind]) and "\n" not in note and len(note) < 300, note


def test_check_as_a_module_does_not_hang_on_a_fifo_cache(tmp_path):
    path = str(tmp_path / "tune.json")
    os.mkfifo(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPER_") or k == "HYPER_DETECTOR"}
    env.update(HYPER_TUNE_CACHE=path, COLUMNS="400")
    run = subprocess.run(
        [sys.executable, "-m", "hyper_backend.check"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    (line,) = [ln for ln in run.stdout.splitlines() if "HYPER_TUNE_CACHE" in ln]
    assert "is a FIFO, not a regular file" in line


# ----------------------------------------------------------------------------------------------------------
# issue 18 item 11: a write that drops records this version rejects keeps the file as it was
# ----------------------------------------------------------------------------------------------------------


def test_a_write_keeps_a_copy_of_the_records_it_drops(tmp_path):
    """An entry of a newer release (a params field this version does not know) used to be deleted by the next
    write with only a warning. The write still drops it from the file this version reads (so it stops warning),
    but first keeps the whole file as ``<path>.rejected`` (``.rejected.1``, ... when taken): nothing is lost."""
    path = str(tmp_path / "tune.json")
    newer = _raw_entry(bucket=4096, params={"block_size": 64, "a_newer_knob": 3})
    texts = []
    for i in range(2):
        texts.append(_cache_text(entries={"newer": newer, "mine": _raw_entry(bucket=1024 + i)}))
        with open(path, "w") as f:
            f.write(texts[-1])
        before = {n for n in os.listdir(tmp_path)}
        with pytest.warns(
            store.CacheWarning, match=r"dropping 1 entries .*a_newer_knob.*kept as .*tune\.json\.rejected"
        ):
            writer.record(path, [_entry(64)])
        data = json.load(open(path))
        assert sorted(data["entries"]) == sorted([f"{DEV}|float32|d16|full|64", "mine"])
        kept = "tune.json.rejected" + ("" if i == 0 else ".1")
        assert set(os.listdir(tmp_path)) - before - {"tune.json.lock"} == {kept}
    assert [open(tmp_path / name).read() for name in ("tune.json.rejected", "tune.json.rejected.1")] == texts


# ----------------------------------------------------------------------------------------------------------
# item 6: tuned values are validated; none makes a call allocate more than O(n (b + m))
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"sample_size": -1},
        {"block_size": 0},
        {"lsh_num_projs": 31},
        {"min_seq_len": 0},
        {"causal_depth": 99},
        {"seed": -3},
        {"block_size": 2**63},
        {"block_size": 32.0},
        {"block_size": True},
        {"block_size": None},
        {"no_such_field": 1},
    ],
)
def test_cache_entries_hyperconfig_refuses_are_ignored_with_a_warning(params, tmp_path):
    path = str(tmp_path / "tune.json")
    with open(path, "w") as f:
        f.write(
            _cache_text(
                entries={"bad": _raw_entry(params=params), "good": _raw_entry(bucket=65536, params={"block_size": 8})}
            )
        )
    with pytest.warns(store.CacheWarning, match="ignored"):
        hit = store.lookup_tuned(path, device=CPU, dtype=torch.float32, head_dim=16, causal=False, seq_len=64)
    assert hit == {"block_size": 8}  # the bad entry was the nearest; the only valid one is used instead


_HUGE_SAMPLE = textwrap.dedent("""
    import os, resource, sys, torch
    import hyper_backend
    from hyper_backend.autotune import schema, store, writer
    path = sys.argv[1]
    entries = [schema.make_entry(device=schema.device_key("cpu"), dtype="float32", head_dim=16, causal=causal,
                                seq_len=64, params={"sample_size": 2147483647, "block_size": 16,
                                                    "min_seq_len": 16}, tuned={})
               for causal in (False, True)]
    writer.record(path, entries)
    os.environ["HYPER_TUNE_CACHE"] = path
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more, not 17 GB
    q = torch.randn(1, 1, 64, 16)
    for causal in (False, True):
        out = hyper_backend.hyper_attention(q, q, q, is_causal=causal)
        assert out.shape == q.shape and bool(torch.isfinite(out).all())
    print("ok")
""")


def test_huge_tuned_sample_size_does_not_allocate_gigabytes(tmp_path):
    """``sample_size: 2147483647`` passes `HyperConfig` validation, so the cache lookup keeps it; the op clamps it
    to what the call can use (kernels/op.py `fit`), so a call at n=64 fits in 1 GiB more than the process
    already maps (it asked for 17 GB before)."""
    proc = subprocess.run(
        [sys.executable, "-c", _HUGE_SAMPLE, str(tmp_path / "tune.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# item 7: HYPER_LAYERS ranges are stored as ranges
# ----------------------------------------------------------------------------------------------------------

_HUGE_RANGE = textwrap.dedent("""
    import os, resource
    from hyper_backend.config import LayerSelection, read_env
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
    s = read_env({"HYPER_LAYERS": "0-100000000000000000"})["layers"]
    assert s.contains(0, None) and s.contains(10**17, None) and not s.contains(10**17 + 1, None)
    print(s.key())
    big = LayerSelection.parse("7, 0-3, 2-5, 10-20, 21, 100000-100000000000000000000")
    assert big.ranges == ((0, 5), (7, 7), (10, 21), (100000, 10**20))
    assert [i for i in (0, 5, 6, 7, 8, 9, 10, 21, 22, 99999, 100000, 10**20, 10**20 + 1)
            if big.contains(i, None)] == [0, 5, 7, 10, 21, 100000, 10**20]
    print(big.key())
""")


def test_huge_layer_range_parses_at_once_in_little_memory():
    proc = subprocess.run(
        [sys.executable, "-c", _HUGE_RANGE],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["set:0-100000000000000000", "set:0-5,7,10-21,100000-100000000000000000000"]


def test_layer_ranges_merge_and_keep_their_public_behaviour():
    s = LayerSelection.parse("5-1000")
    assert [i for i in (4, 5, 6, 999, 1000, 1001) if s.contains(i, None)] == [5, 6, 999, 1000]
    # (ranges too large to expand are tested in a memory-limited subprocess above)
    assert LayerSelection.parse("7, 0-3, 2-5, 10-20, 21").ranges == ((0, 5), (7, 7), (10, 21))
    # equal selections are equal however they are written, and small sets keep their expanded key
    assert LayerSelection.parse("0-3") == LayerSelection.parse("3,2,1,0") == LayerSelection("set", indices={0, 1, 2, 3})
    assert LayerSelection.parse("0-3").key() == "set:0,1,2,3"
    assert LayerSelection.parse("1-3,9").key() == "set:1,2,3,9"
    assert hash(LayerSelection.parse("0-3")) == hash(LayerSelection("set", indices=frozenset(range(4))))
    assert LayerSelection.parse([4, 2, 3]).ranges == ((2, 4),)
    assert LayerSelection.parse("2-3").indices == frozenset({2, 3})
    with pytest.raises(EnvError, match="HYPER_LAYERS"):
        read_env({"HYPER_LAYERS": "5-2"})
