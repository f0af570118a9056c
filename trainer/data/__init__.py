"""The trainer's data sets: the CSXA lateral layout (`csxa`), the oblique-view layout (`oblique`),
and their preparation into model inputs with the shared preprocessing (`prepare`)."""
