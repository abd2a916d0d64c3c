"""User scorers (``user_scorers_for_tests:brightness``) for tests/test_user_scorers.py and test_pairs_feedback.py."""
import numpy as np

NOT_CALLABLE = 3


def brightness(images, prompts):
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0) for im in images]


def constant(images, prompts):
    return np.ones(len(images))


def wrong_length(images, prompts):
    return [0.0]


def not_finite(images, prompts):
    return [float("nan")] * len(images)


class Namespace:
    @staticmethod
    def redness(images, prompts):
        return [float(np.asarray(im.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255.0) for im in images]
