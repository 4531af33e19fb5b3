/**
 * conic-qp: export the annotations of each project image as GeoJSON regions.
 *
 * For QuPath 0.4, 0.5, 0.6 and 0.7 (uses exportObjectsToGeoJson, getProjectEntry().getID()).
 *
 *     QuPath script -p /path/to/project.qpproj groovy/export_annotations_geojson.groovy
 *
 * Writes <project folder>/regions/<entryID>.geojson (a FeatureCollection of the image's
 * annotations in level-0 pixels) for every image that has annotations; conic-qp reads these with
 * `--regions-geojson` / conic_qp.sinks.geojson.read_regions to run inference inside them and to
 * make per-region composition tables. The file is written to a temporary name and renamed, so a
 * half-written file is never left behind. Nothing in the project is modified (no --save needed).
 */

import java.nio.file.Files
import java.nio.file.StandardCopyOption

// Must match conic_qp.qupath.project.regions_path.
def REGIONS_DIR = 'regions'
def SUFFIX = '.geojson'

def entry = getProjectEntry()
if (entry == null) {
    println 'conic-qp: no project entry (run this script with a project: QuPath script -p project.qpproj ...)'
    return
}
// The entry id becomes a file name: only plain names (QuPath's ids are numbers), which
// conic_qp.outputs.entry_stem keeps as they are; any other id is refused, never resolved.
def entryId = entry.getID().toString()
if (!(entryId ==~ /[0-9A-Za-z_-]{1,100}/) || entryId ==~ /(?i)(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])/) {
    println "conic-qp: '${entry.getImageName()}': entry id '${entryId}' is not a plain name (QuPath's ids are numbers); nothing exported"
    return
}
def annotations = getAnnotationObjects()
if (annotations.isEmpty()) {
    println "conic-qp: '${entry.getImageName()}' has no annotations; nothing exported"
    return
}
def outDir = getProject().getPath().getParent().resolve(REGIONS_DIR)
Files.createDirectories(outDir)
def target = outDir.resolve(entryId + SUFFIX)
def tmp = outDir.resolve(entryId + SUFFIX + '.tmp')
exportObjectsToGeoJson(annotations, tmp.toString(), 'FEATURE_COLLECTION')
Files.move(tmp, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
println "conic-qp: '${entry.getImageName()}': exported ${annotations.size()} annotations to ${target}"
