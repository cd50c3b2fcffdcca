"""`python -m transformer.attention --workdir=DIR --text="..." --out=FILE.png`: attention maps.

See transformer/attention_plot.py.
"""

from transformer.attention_plot import main, run  # noqa: F401

if __name__ == '__main__':
    run()
