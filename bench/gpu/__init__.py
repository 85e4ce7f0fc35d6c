"""The GPU bench: what is measured on a lent GPU machine, and the kit that lets it run there.

A lent GPU machine has torch but no tritonserver, gateway packages or network, and gives a
session minutes, not hours; so everything it lacks is built here first and the runs are
single commands that finish, and leave their figures, within that time:

- `make gpu-kit` (`python -m bench.gpu.kit`): builds, on this machine, the folder that is
  carried there (`kit.py`; `install.py` installs it there, offline);
- `python -m bench.gpu.stack --kit build/gpu-kit --out DIR`: the whole stack there,
  Triton and the gateway, served and measured in one run (`stack.py`, with its load
  clients in `load.py`, its stages in `measure.py`, the tuning variants in `tuning.py`,
  the Markdown in `report.py`); `--cpu-dry-run` runs the same stages here, which the
  tests do so it cannot rot between GPU runs;
- `python -m bench.gpu.inprocess`: the frozen TorchScript alone, in-process, fp32
  against fp16 (`inprocess.py`), which needs nothing but torch.

Importing the package imports nothing: the installer runs before the kit's packages are
there, and the load clients must not import torch.
"""
