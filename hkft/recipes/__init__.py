"""The train and eval recipes, with the Trainer subclass, the overfitting monitor and the run's curves."""
