#!/bin/bash
echo hang-scenario-sleeping
sleep 1000
