"""The synthetic multi-platform credit population (``fedcredit datagen``).

Draws a world in which the risk no single platform can see exists: a latent risk shared by
all platforms, multi-platform borrowing that rises with it, and default driven partly by
total debt across platforms relative to income. See docs/datagen.md.
"""
