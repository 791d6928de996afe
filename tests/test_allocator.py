"""zerorl.allocator: which malloc the zerorl command re-executes itself on, and that it does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zerorl import allocator, cli
from zerorl.allocator import ENV_APPLIED, ENV_CHOICE, AllocatorError, find, loaded, relaunch_plan, resolve


def _libraries(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return [tmp_path]


def test_auto_prefers_jemalloc_then_tcmalloc_then_the_system_malloc(tmp_path):
    assert resolve("auto", dirs=[tmp_path]) == ("system", None)
    dirs = _libraries(tmp_path, "libtcmalloc_minimal.so.4")
    assert resolve("auto", dirs=dirs) == ("tcmalloc", str(tmp_path / "libtcmalloc_minimal.so.4"))
    dirs = _libraries(tmp_path, "libjemalloc.so.2")
    assert resolve("auto", dirs=dirs) == ("jemalloc", str(tmp_path / "libjemalloc.so.2"))
    assert resolve("tcmalloc", dirs=dirs)[0] == "tcmalloc"
    assert resolve("system", dirs=dirs) == ("system", None)


def test_a_requested_allocator_that_is_missing_or_unknown_is_a_clear_error(tmp_path):
    with pytest.raises(AllocatorError, match="no libjemalloc.so.2 or libjemalloc.so.*Fix: apt-get install libjemalloc2"):
        resolve("jemalloc", dirs=[tmp_path])
    with pytest.raises(AllocatorError, match="ZERORL_ALLOCATOR='mimalloc'.*Fix: one of auto, jemalloc, tcmalloc, system"):
        resolve("mimalloc", dirs=[tmp_path])


def test_the_plan_preloads_the_library_once_and_respects_what_is_already_there(tmp_path):
    dirs = _libraries(tmp_path, "libjemalloc.so.2")
    library = str(tmp_path / "libjemalloc.so.2")
    kind, env = relaunch_plan({"LD_PRELOAD": "/opt/libother.so", "PATH": "/bin"}, dirs=dirs,
                              platform="linux")
    assert kind == "jemalloc" and env["LD_PRELOAD"] == f"{library}:/opt/libother.so"
    assert env[ENV_APPLIED] == "jemalloc" and env["PATH"] == "/bin"
    assert relaunch_plan({}, dirs=dirs, platform="linux")[1]["LD_PRELOAD"] == library
    # Never twice, not off Linux, not over an allocator already loaded, not when the system's is asked for.
    assert relaunch_plan({ENV_APPLIED: "jemalloc"}, dirs=dirs, platform="linux") is None
    assert relaunch_plan({}, dirs=dirs, platform="darwin") is None
    assert relaunch_plan({}, dirs=dirs, platform="linux", running_on="tcmalloc") is None
    assert relaunch_plan({ENV_CHOICE: "system"}, dirs=dirs, platform="linux") is None
    assert relaunch_plan({ENV_CHOICE: " Auto "}, dirs=dirs, platform="linux")[0] == "jemalloc"
    with pytest.raises(AllocatorError):  # a bad value is reported even where nothing would be preloaded
        relaunch_plan({ENV_CHOICE: "fast"}, dirs=dirs, platform="darwin")


def test_loaded_reads_the_mapped_libraries():
    assert loaded("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n") == "jemalloc"
    assert loaded("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libtcmalloc_minimal.so.4\n") == "tcmalloc"
    assert loaded("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n") is None


def test_main_called_from_a_program_never_re_executes(monkeypatch, capsys):
    def forbidden(command):
        raise AssertionError("main() re-executed the process")

    monkeypatch.setattr(allocator, "relaunch", forbidden)
    assert cli.main([]) == 0
    assert "zerorl" in capsys.readouterr().out


def test_the_command_reports_a_bad_allocator_before_any_work():
    env = dict(os.environ, **{ENV_CHOICE: "mimalloc"})
    env.pop(ENV_APPLIED, None)
    done = subprocess.run([sys.executable, "-m", "zerorl.cli", "train", "--max-steps", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "ZERORL_ALLOCATOR='mimalloc' is not an allocator zerorl knows" in done.stderr


@pytest.mark.skipif(sys.platform != "linux" or find("jemalloc") is None,
                    reason="no libjemalloc here (make install puts it on Debian/Ubuntu machines as root)")
def test_the_process_re_executes_on_jemalloc():
    env = dict(os.environ, **{ENV_CHOICE: "jemalloc"})
    env.pop(ENV_APPLIED, None)
    env.pop("LD_PRELOAD", None)
    child = ("import os\nfrom zerorl.allocator import loaded\n"
             "print(loaded(), os.environ['ZERORL_ALLOCATOR_APPLIED'])\n")
    script = ("import sys\nfrom zerorl.allocator import relaunch\n"
              f"relaunch([sys.executable, '-c', {child!r}])\nprint('not re-executed')\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["jemalloc", "jemalloc"]
