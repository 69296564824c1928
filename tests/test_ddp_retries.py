"""The DDP test helper retries process-group start-up failures only, never the code under test's failures."""

import signal

import pytest

from tests.ddp import is_infrastructure_failure, with_retries


def test_start_up_failures_are_recognised():
    assert is_infrastructure_failure("RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert is_infrastructure_failure("", returncode=-signal.SIGABRT)
    assert not is_infrastructure_failure("ValueError: model.init_args.train_order must be 'raster' or 'random'")
    assert not is_infrastructure_failure("AssertionError: gloo ranks disagree")
    assert not is_infrastructure_failure("", returncode=1)


def test_retries_a_failed_start_in_a_fresh_folder(tmp_path):
    seen = []

    def run(folder):
        seen.append(folder)
        if len(seen) == 1:
            raise RuntimeError("gloo: Connection reset by peer")
        (folder / "done").write_text("ok")

    folder = with_retries(run, tmp_path)
    assert len(seen) == 2 and seen[0] != seen[1] and (folder / "done").is_file()


def test_never_retries_the_code_under_test(tmp_path):
    calls = []

    def run(folder):
        calls.append(folder)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        with_retries(run, tmp_path)
    assert len(calls) == 1
