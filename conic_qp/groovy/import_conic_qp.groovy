/**
 * conic-qp: import nucleus detections into the current QuPath project image.
 *
 * For QuPath 0.4, 0.5, 0.6 and 0.7 (uses getProjectEntry().getID(), PathIO.readObjectsFromGeoJSON,
 * removeObjects / addObjects).
 *
 * Run it on every image of a project, saving each one:
 *
 *     QuPath script -p /path/to/project.qpproj --save groovy/import_conic_qp.groovy
 *
 * (or open it in QuPath's script editor and use Run > Run for project). For each image it reads
 * <project folder>/detections/<entryID>.geojson.gz written by `conic-qp annotate`, REMOVES the
 * detections a previous conic-qp import added (they carry the measurement "conic-qp"), and adds
 * the new ones. Annotations and all other objects are left untouched. Images without a
 * detections file are skipped unchanged, so re-running is safe.
 */

import java.nio.file.Files
import java.util.zip.GZIPInputStream

import qupath.lib.io.PathIO

// Must match conic_qp.sinks.geojson.MARKER and conic_qp.qupath.project.detections_path.
def MARKER = 'conic-qp'
def DETECTIONS_DIR = 'detections'
def SUFFIX = '.geojson.gz'
// true: put each nucleus under its enclosing annotation (slow for a million nuclei).
def RESOLVE_HIERARCHY = false

def entry = getProjectEntry()
if (entry == null) {
    println 'conic-qp: no project entry (run this script with a project: QuPath script -p project.qpproj ...)'
    return
}
def projectDir = getProject().getPath().getParent()
def entryId = entry.getID()
def file = projectDir.resolve(DETECTIONS_DIR).resolve(entryId + SUFFIX)
if (!Files.isRegularFile(file)) {
    println "conic-qp: no detections for '${entry.getImageName()}' (${file}); image left unchanged"
    return
}

// Read first: if the file is unreadable nothing is removed.
def newObjects
def stream = new GZIPInputStream(new BufferedInputStream(Files.newInputStream(file)))
try {
    newObjects = PathIO.readObjectsFromGeoJSON(stream)
} finally {
    stream.close()
}

def hasMarker = { pathObject ->
    def ml = pathObject.getMeasurementList()
    try {
        return ml.containsKey(MARKER)                    // QuPath >= 0.4
    } catch (MissingMethodException ignored) {
        return ml.getMeasurementNames().contains(MARKER) // older API
    }
}
def previous = getDetectionObjects().findAll { hasMarker(it) }
if (!previous.isEmpty())
    removeObjects(previous, true)
addObjects(newObjects)
if (RESOLVE_HIERARCHY)
    resolveHierarchy()
fireHierarchyUpdate()
println "conic-qp: '${entry.getImageName()}': removed ${previous.size()} previous conic-qp detections, added ${newObjects.size()} from ${file.getFileName()}"
