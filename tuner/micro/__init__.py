"""The micro world: a procedural, captioned shape world and a judge, so the suite can train and score a tiny SD model.

`world` turns seeds into scenes (image, caption, labels), `render` writes them to disk as a data set, and `judge`
reads generated images back into labels so training runs can be measured without real Stable Diffusion weights.
"""
