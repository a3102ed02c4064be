"""The engine lease against stand-in `dockerd` and `docker` programs: a dockerd that gives up on
its containerd is started again, one that never comes up is an error quoting its log, and the
engine started here is stopped when the last lease ends."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from deployment.image.docker import Docker, Engine, ImageError

# Fails as dockerd does when its containerd misses the start timeout, `failures` times, then
# runs until stopped; `docker info` answers while the stand-in runs.
DOCKERD = """\
#!/bin/sh
dir="$(dirname "$0")"
for arg in "$@"; do case "$arg" in --pidfile=*) pidfile="${{arg#--pidfile=}}";; esac; done
echo $$ > "$pidfile"
count=$(cat "$dir/starts" 2>/dev/null || echo 0); echo $((count + 1)) > "$dir/starts"
if [ "$count" -lt {failures} ]; then
  echo "failed to start containerd: timeout waiting for containerd to start"
  rm -f "$pidfile"; exit 1
fi
trap 'rm -f "$dir/running" "$pidfile"; exit 0' TERM
touch "$dir/running"
while :; do sleep 0.1; done
"""
DOCKER = '#!/bin/sh\n[ -e "$(dirname "$0")/running" ]\n'


def stand_ins(tmp_path: Path, failures: int) -> Engine:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("dockerd", DOCKERD.format(failures=failures)), ("docker", DOCKER)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return Engine(
        Docker(binary=str(bin_dir / "docker")),
        tmp_path / "log" / "dockerd.log",
        start_timeout_s=30,
        dockerd=str(bin_dir / "dockerd"),
        shared_dir=tmp_path / "shared",
    )


def test_a_dockerd_that_gives_up_on_containerd_is_started_again_and_stopped_by_the_last_lease(
    tmp_path: Path,
) -> None:
    engine = stand_ins(tmp_path, failures=4)
    engine.start()
    assert engine.started_here
    assert (tmp_path / "bin" / "starts").read_text().strip() == "5"
    pid = int((tmp_path / "shared" / "dockerd.pid").read_text())
    engine.stop(grace_s=10)
    assert not (tmp_path / "bin" / "running").exists()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # exited and reaped: no zombie left behind


def test_a_dockerd_that_keeps_exiting_is_an_error_quoting_its_log(tmp_path: Path) -> None:
    engine = stand_ins(tmp_path, failures=99)
    with pytest.raises(ImageError) as raised:
        engine.start()
    assert raised.value.reason == "engine_failed"
    assert "exited 5 times" in str(raised.value)
    assert "timeout waiting for containerd to start" in str(raised.value)
    assert not engine.started_here


def test_the_engine_holds_none_of_its_starters_descriptors(tmp_path: Path) -> None:
    """A CI runner reading its pipe to the end must not wait on a dockerd left running."""
    engine = stand_ins(tmp_path, failures=0)
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        engine.start()
        os.close(write_end)
        assert os.read(read_end, 1) == b""  # end of file: no other writer holds the pipe
    finally:
        os.close(read_end)
        engine.stop(grace_s=10)
