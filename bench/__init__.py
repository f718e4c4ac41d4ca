"""loraserve's benchmarks and load generators, run from the repository's root as
`python -m bench.NAME` (or from anywhere as `python -m loraserve.bench.NAME`).

`python -m` puts the root first on sys.path, where the repository's folders (`kernels/`,
`server/`, ...) would shadow installed packages of the same names; importing loraserve takes
the root off (loraserve/__init__.py), so it is the first thing this package does, before any
benchmark imports anything else. The benchmarks import each other relatively and loraserve
as `loraserve.*`.
"""

import loraserve  # noqa: F401 (takes the clone's root off sys.path)
