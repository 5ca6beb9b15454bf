"""Understanding: 10 s windows, the feature cache, the scheduler in front of the model, the model worker and
the question desk."""
