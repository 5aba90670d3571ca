"""fedmoe on Flower (``flwr``): the same methods and federation loop, the clients on Flower's
simulation engine or on SuperNodes of their own. Needs the ``flower`` extra."""
