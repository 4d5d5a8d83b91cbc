"""Command-line mistakes end in one ``error:`` line naming the flag (config_cli, user_errors)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from absl import flags

from v2w_jax import config_cli, user_errors
from v2w_jax.user_errors import UserError


def _parse(*args: str, default: str | None = "configs/tiny.py"):
  flag = config_cli.ConfigFlag(default, "Config file.", flag_values=flags.FlagValues())
  return flag, flag.parse(["prog", *args])


def test_overrides_apply_and_default_file_is_used(repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)
  _, (rest, config, want_help) = _parse("--config.data.num_frames=13", "--config.data.video_size=(64,96)")
  assert rest == ["prog"] and not want_help
  assert config.data.num_frames == 13 and tuple(config.data.video_size) == (64, 96)
  assert config.job.name == "tiny"


@pytest.mark.parametrize("args,expected", [
    (("--config=configs/nope.py",), r"--config=configs/nope\.py: no such config file .*configs/tiny\.py"),
    (("--config.data.num_framez=3",), r"--config\.data\.num_framez: .*no field .*did you mean data\.num_frames\?"),
    (("--config.dat.num_frames=3",), r"--config\.dat\.num_frames: the config has no field"),
    (("--config.data.video_size=abc",), r"--config\.data\.video_size=abc: expected numbers like \(32, 48\)"),
    (("--config.data.num_frames=abc",), r"--config\.data\.num_frames=abc: invalid literal"),
    (("--nosuchflag=1",), r"nosuchflag"),
], ids=["missing_file", "field_typo", "group_typo", "tuple_of_text", "int_of_text", "unknown_flag"])
def test_mistakes_are_user_errors_naming_the_flag(repo_root, monkeypatch, args, expected):
  monkeypatch.chdir(repo_root)
  with pytest.raises(UserError, match=expected):
    _parse(*args)


def test_required_config_and_broken_config_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match="--config is required"):
    _parse(default=None)
  (tmp_path / "broken.py").write_text("def get_config():\n  raise KeyError('oops')\n")
  with pytest.raises(UserError, match=r"--config=broken\.py: the config file does not load: KeyError"):
    _parse("--config=broken.py")


def test_help_lists_every_field_with_its_value(repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)
  flag, (_, config, want_help) = _parse("--help", "--config.data.num_frames=13")
  assert want_help
  text = flag.help_text(config, ["prog"])
  assert "--config=FILE" in text and "configs/tiny.py" in text
  assert "  data.num_frames = 13" in text and "  model.num_blocks = 2" in text and "  trainer.max_iter = 40" in text


def test_main_guard_prints_one_line_and_returns_2(capsys, monkeypatch):
  monkeypatch.delenv("V2W_TRACEBACK", raising=False)

  @user_errors.main_guard
  def main():
    raise UserError("data.dataset_dir=x: the folder does not exist")

  assert main() == user_errors.EXIT_USAGE == 2
  assert capsys.readouterr().err == "error: data.dataset_dir=x: the folder does not exist\n"
  monkeypatch.setenv("V2W_TRACEBACK", "1")
  with pytest.raises(UserError):
    main()
  guarded = user_errors.main_guard(lambda: (_ for _ in ()).throw(KeyError("x")))
  with pytest.raises(KeyError):  # not a user error: the traceback stays
    guarded()


def test_train_entry_point_one_error_line_and_help(repo_root):
  """The wiring: absl's flag parsing in `python -m v2w_jax.train` goes through ConfigFlag."""
  proc = subprocess.run([sys.executable, "-m", "v2w_jax.train", "--config.data.num_framez=3"], cwd=repo_root,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --config.data.num_framez")
  proc = subprocess.run([sys.executable, "-m", "v2w_jax.train", "--config=configs/nemo.py", "--help"], cwd=repo_root,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "config fields of configs/nemo.py" in proc.stdout and "  data.num_frames = 93" in proc.stdout
