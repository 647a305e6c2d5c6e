"""The overlay ships only its own modules and imports from the working tree beside upstream SGLang."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class TestOverlayPackaging(unittest.TestCase):
    def test_imports_resolve_to_working_tree_and_upstream(self):
        """... and importing the config (or the trainer) loads no numba: only a float32 CPU
        tensor's write does (GPU boxes and SGLang's scheduler processes never pay for it);
        importing the API installs no CPU stand-ins for upstream's imports (only starting an
        engine does, `cpu_standins.install`)."""
        code = (
            "import sys, sglang.srt.mezo.config; print('numba-after-config', 'numba' in sys.modules);"
            "import sglang, sglang.srt.mezo_trainer as t;"
            "print('numba-after-trainer', 'numba' in sys.modules);"
            "from sglang.srt.mezo.backends import cpu_standins; print('standins-after-api', cpu_standins.installed());"
            "cpu_standins.install(); import sglang.srt.entrypoints.engine as e;"
            "print(t.__file__); print(e.__file__); print(sglang.__file__)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
        self.assertIn("numba-after-config False", out.stdout)
        self.assertIn("numba-after-trainer False", out.stdout)
        self.assertIn("standins-after-api False", out.stdout)
        trainer_file, engine_file, sglang_file = out.stdout.split()[-3:]
        self.assertEqual(Path(trainer_file), REPO / "python" / "sglang" / "srt" / "mezo_trainer.py")
        for upstream in (engine_file, sglang_file):
            self.assertIn("site-packages", upstream)
            self.assertFalse(Path(upstream).is_relative_to(REPO / "python"), upstream)

    def test_wheel_contains_no_upstream_file(self):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, str(REPO)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            (wheel,) = Path(out).glob("*.whl")
            names = [
                n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))
            ]
        self.assertIn("sglang/srt/mezo_trainer.py", names)
        self.assertIn("sglang/srt/mezo/demo_data/train.jsonl", names)
        self.assertIn("sglang/srt/mezo/kernels/triton_kernels.py", names)
        shipped = {n for n in names if n.endswith(".py")}
        self.assertTrue(
            all(n == "sglang/srt/mezo_trainer.py" or n.startswith("sglang/srt/mezo/") for n in shipped), shipped
        )
        self.assertNotIn("sglang/__init__.py", names)
        self.assertNotIn("sglang/srt/__init__.py", names)


if __name__ == "__main__":
    unittest.main(verbosity=2)
