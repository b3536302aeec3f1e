"""The reproduction of Kang, Hong & Maul (2020) on data that ships with packages (``netmerge-fast demo``).
Needs the ``demo`` extra (scikit-learn, mnist1d, matplotlib); ``import netmerge_fast`` does not."""
