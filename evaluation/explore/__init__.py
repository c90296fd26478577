"""The patch-similarity explorer: `python -m evaluation.explore` (evaluation/explore/cli.py) writes one HTML page
that shows, for a patch one points at, which patches of every image each model finds similar.

data.py computes what the page embeds (images, encoded features, PCA-RGB) and the similarity rules; page.py
inlines it with static/page.html, explore.css and explore.js; figure.py draws the same view with matplotlib.
"""
