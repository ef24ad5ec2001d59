"""Command-line entry point in a checkout: `python main.py --config=configs/mnist.py
--workdir=runs/mnist`; the same as the `ddpm` console script (`ddpm.cli`)."""

from ddpm import cli

if __name__ == "__main__":
    cli.run()
