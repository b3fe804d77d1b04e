"""Curvatures of the training loss: the exact GGN (dense or Krylov), K-FAC and EK-FAC, and which parameters they track."""
