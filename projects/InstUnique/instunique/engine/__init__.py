"""Training and evaluation around detectron2's DefaultTrainer."""
