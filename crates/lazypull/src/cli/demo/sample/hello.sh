#!/bin/sh
# A script shipped in the lazypull sample image.
echo "hello from a lazily pulled image"
