"""Small CNN on the 8×8 digits images, K-FAC and EK-FAC against the exact Gauss-Newton inverse, alone:
measures (benchmarks/sections/cnn.py) and prints the page's section (benchmarks/page/wide.py).

    python benchmarks/cnn.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from page.wide import render_cnn  # noqa: E402
from sections import cnn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter training")
    parser.add_argument("--smoke", action="store_true", help="200 train × 20 test: only checks that it runs")
    args = parser.parse_args()
    print("\n".join(render_cnn(cnn.measure(quick=args.quick, smoke=args.smoke)).lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
