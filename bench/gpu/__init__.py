"""The GPU bench: what is measured on a lent GPU machine, and the kit that lets it run there.

A lent GPU machine has torch but no tritonserver, gateway packages or network, and gives a
session minutes, not hours; so everything it lacks is built here first, and each run there
is one command that finishes, and leaves its figures, within that time:

- `make gpu-kit` (`python -m bench.gpu.kit`): builds here the folder carried there;
- `python -m bench.gpu.stack --kit build/gpu-kit --out DIR`: the whole stack there, Triton
  and the gateway, served and measured in one run; `--cpu-dry-run` runs the same stages
  here, as the tests do, so the command cannot rot between GPU runs;
- `python -m bench.gpu.inprocess --out FILE`: the frozen TorchScript alone, in-process,
  fp32 against fp16; it needs nothing but torch.

The modules, each importing only those above it in this list (no circle, so any of them
can be read, tested and imported alone):

- `layout`: the kit folder's names, which the builder and the installer share;
- `install`: the kit installed on the GPU machine, offline, standard library only;
- `kit`: the kit builder (`make gpu-kit`);
- `report`: the Markdown of the stack's results, from the JSON alone;
- `load`: the closed-loop load clients (`python -m bench.gpu.load`, spawned by the stack),
  which import no torch;
- `plan`: what a stack run measures, over the contract's networks, and its time budgets;
- `run`: the run (deadline, results) and the stack (what stages hand each other);
- `server`: the tritonserver launcher both serving stages use;
- `prepare`: the stages before any measuring (install, environment, export);
- `inprocess`: the in-process bench, whose timing and agreement helpers the variants reuse;
- `tuning`: the tuning variants and their in-process measurement;
- `measure`: the accuracy, side-by-side and gateway stages;
- `winner`: the tuning and winner stages;
- `stack`: the device command, which orders the stages.

Importing the package imports nothing: the installer runs before the kit's packages are
there, and the load clients must not import torch.
"""
