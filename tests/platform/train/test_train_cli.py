"""`dino train` / `dino eval`: help text with examples, one-line errors before anything starts."""
import pytest

from dino_platform.cli import main


def test_help_has_examples(capsys):
    for command in ("train", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "/no/such/job.yaml"], "config file not found"),
    (["eval", "--checkpoint", "/no/such/ckpt", "--data", "/no/such/shards"], "neither a weights file nor a checkpoint"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_config_value_names_the_field(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("data: {train_uri: /x}\nscaling: {accumulation_steps: 0}\n")
    assert main(["train", str(job)]) == 2
    assert "scaling.accumulation_steps: 0 must be > 0" in capsys.readouterr().err
