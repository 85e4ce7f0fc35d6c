"""The kit's folder, by name: what the builder (`kit.py`) writes here and the installer
(`install.py`) and the device command (`prepare.py`) read on the GPU machine.

Its own module so that both sides share one spelling of each name, and so that the
installer, which runs before the kit's packages are installed, can take them without
importing the builder (which imports the backend builder, `embedded/backend.py`): the
standard library only.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"
SERVER_ARCHIVE = "tritonserver.tar.xz"
# Inside the archive: the wheel's own layout under one top folder.
SERVER_TOP = "tritonserver"
SERVER_BINARY = Path("pytriton") / "tritonserver" / "bin" / "tritonserver"
SERVER_LIBS = Path("nvidia_pytriton.libs")
BACKEND_DIR = "backend"
WHEELS_DIR = "wheels"
REQUIREMENTS = "requirements.txt"
PHOTOS_DIR = "photos"
