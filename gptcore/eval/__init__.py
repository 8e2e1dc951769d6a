"""Evaluation stages of the workdir's torch models: the LM, the classifier with its explanations, and the
chat model beside its base."""
