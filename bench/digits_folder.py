"""Write scikit-learn's bundled handwritten digits (8x8 grayscale, 1,797 images, no download) as an image folder
ROOT/{train,test}/<digit>/NNNN.png, split 1,347 / 450 (stratified, seed 0): a small real dataset to try the
defaults on.

    python bench/digits_folder.py /tmp/digits
    featcache train-head --data /tmp/digits --weights vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main(root: Path) -> None:
    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(pixels, digits.target, test_size=450, random_state=0,
                                                        stratify=digits.target)
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (img, label) in enumerate(zip(xs, ys)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    print(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the folder to write (made if missing)")
    main(parser.parse_args().root)
