"""VGG16 (Simonyan & Zisserman, 2014): featcache's default backbone."""

from featcache.backbones.spec import BackboneSpec

VGG16 = BackboneSpec(
    name="vgg16",
    application="keras.applications.vgg16.VGG16",
    layers=("block1_conv1", "block1_conv2", "block1_pool",
            "block2_conv1", "block2_conv2", "block2_pool",
            "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
            "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
            "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"),
    default_layer="block3_pool",
    weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    # the text recorded in caches since format 1: keep it, so older caches read the same
    preprocessing="keras.applications.vgg16.preprocess_input (caffe: RGB->BGR, minus ImageNet channel means)",
    peak_bytes_per_pixel=4 * (3 + 2 * 64),   # the image and two 64-channel block1 convolutions at full size
    block_ends=("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"),
)
