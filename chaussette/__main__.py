"""python -m chaussette"""

from chaussette.cli import run

if __name__ == "__main__":
    run()
