/**
 * conic-qp: import nucleus detections into the images of a QuPath project.
 *
 * For QuPath 0.4, 0.5, 0.6 and 0.7 (getProjectEntry().getID(), PathIO.readObjectsFromGeoJSON,
 * addObjectBelowParent, insertPathObjects, ImageData.setImageType). Run it on every image,
 * from the folder the paths are relative to:
 *
 *     QuPath script -p /path/to/project.qpproj /path/to/groovy/import_conic_qp.groovy
 *
 * (or open it in QuPath's script editor and use Run > Run for project; close the project in
 * QuPath before running it from the command line). No --save is needed: the script saves each
 * image it changes itself and leaves every other image untouched.
 *
 * For each image it reads <project folder>/detections/<entryID>/manifest.json, written by
 * `conic-qp annotate`, and then:
 *   1. if the image has no annotations and conic-qp knows its regions (regions.geojson), adds
 *      them as annotations, once (the image is marked with the property conic-qp.regions);
 *   2. reads every detection file, then REMOVES the detections of a previous conic-qp import
 *      (they carry the measurement "conic-qp") - if a file is unreadable nothing is removed;
 *   3. adds each file's detections below the annotation named in the manifest (its QuPath
 *      UUID; the file's detections are those whose centroid that annotation holds), so that
 *      QuPath's annotation measurements count them, or at the root of the hierarchy. If the
 *      image's annotations are not the ones conic-qp knew (drawn, edited or deleted since),
 *      QuPath places the detections itself (insertPathObjects: same result, slower);
 *   4. sets the image type to Brightfield (H&E) when it is not set, and saves the image.
 * Annotations and all other objects are left untouched. Images without a manifest are skipped
 * unchanged, so re-running is safe.
 */

import java.nio.file.Files
import java.util.zip.GZIPInputStream

import com.google.gson.JsonParser
import qupath.lib.images.ImageData
import qupath.lib.io.PathIO

// Must match conic_qp.sinks.geojson (MARKER, MANIFEST, MANIFEST_FORMAT) and
// conic_qp.qupath.project.detections_dir.
def MARKER = 'conic-qp'
def DETECTIONS_DIR = 'detections'
def MANIFEST = 'manifest.json'
def MANIFEST_FORMAT = 'conic-qp detections'
def REGIONS_PROPERTY = 'conic-qp.regions'

def entry = getProjectEntry()
if (entry == null) {
    println 'conic-qp: no project entry (run this script with a project: QuPath script -p project.qpproj ...)'
    return
}
def name = entry.getImageName()
// The entry id becomes a folder name: only plain names (QuPath's ids are numbers), which
// conic_qp.outputs.entry_stem keeps as they are; any other id is refused, never resolved.
def entryId = entry.getID().toString()
if (!(entryId ==~ /[0-9A-Za-z_-]{1,100}/) || entryId ==~ /(?i)(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])/) {
    println "conic-qp: '${name}': entry id '${entryId}' is not a plain name (QuPath's ids are numbers); image left unchanged: re-add the image in QuPath"
    return
}
def folder = getProject().getPath().getParent().resolve(DETECTIONS_DIR).resolve(entryId)
def manifestFile = folder.resolve(MANIFEST)
if (!Files.isRegularFile(manifestFile)) {
    println "conic-qp: '${name}': no ${DETECTIONS_DIR}/${entryId}/${MANIFEST}; image left unchanged"
    return
}
def manifest
def reader = Files.newBufferedReader(manifestFile, java.nio.charset.StandardCharsets.UTF_8)
try {
    manifest = JsonParser.parseReader(reader).getAsJsonObject()
} finally {
    reader.close()
}
if (!manifest.has('format') || manifest.get('format').getAsString() != MANIFEST_FORMAT) {
    println "conic-qp: '${name}': ${manifestFile} is not a conic-qp manifest; image left unchanged"
    return
}

def readObjects = { path ->
    def stream = new BufferedInputStream(Files.newInputStream(path))
    if (path.getFileName().toString().endsWith('.gz'))
        stream = new GZIPInputStream(stream)
    try {
        return PathIO.readObjectsFromGeoJSON(stream)
    } finally {
        stream.close()
    }
}
def textOf = { json, key -> json.has(key) && !json.get(key).isJsonNull() ? json.get(key).getAsString() : null }
// Insert objects where QuPath's own rules put them (insertPathObjects, or add + resolve).
def insertAll = { hier, objects ->
    try {
        hier.insertPathObjects(objects)
    } catch (MissingMethodException ignored) {
        hier.addObjects(objects)
        hier.resolveHierarchy()
    }
}
def countDetections
countDetections = { pathObject ->
    int n = 0
    for (child in pathObject.getChildObjects())
        n += (child.isDetection() ? 1 : 0) + countDetections(child)
    return n
}

def imageData = getCurrentImageData()
def hierarchy = imageData.getHierarchy()

// 1. the regions, as annotations, for an image that has none (once)
def regionsFile = textOf(manifest, 'regions_file')
if (regionsFile != null && hierarchy.getAnnotationObjects().isEmpty()
        && imageData.getProperty(REGIONS_PROPERTY) == null) {
    def regions = readObjects(folder.resolve(regionsFile))
    insertAll(hierarchy, regions)
    imageData.setProperty(REGIONS_PROPERTY, "added by conic-qp from ${DETECTIONS_DIR}/${entryId}/${regionsFile}".toString())
    println "conic-qp: '${name}': added ${regions.size()} annotations (the regions conic-qp ran in)"
}

// 2. read everything first: if a file is unreadable, nothing is removed
def groups = []
int nNew = 0
for (f in manifest.getAsJsonArray('files')) {
    def file = f.getAsJsonObject()
    def objects = readObjects(folder.resolve(file.get('file').getAsString()))
    int expected = file.get('count').getAsInt()
    if (objects.size() != expected)
        println "conic-qp: '${name}': WARNING ${file.get('file').getAsString()} gave ${objects.size()} objects, the manifest says ${expected}"
    groups << [textOf(file, 'parent'), objects]
    nNew += objects.size()
}

def hasMarker = { pathObject ->
    def ml = pathObject.getMeasurementList()
    try {
        return ml.containsKey(MARKER)                    // QuPath >= 0.4
    } catch (MissingMethodException ignored) {
        return ml.getMeasurementNames().contains(MARKER) // older API
    }
}
def previous = hierarchy.getDetectionObjects().findAll { hasMarker(it) }
if (!previous.isEmpty())
    hierarchy.removeObjects(previous, true)

// 3. below their parent annotations, when the image's annotations are those conic-qp knew
def annotations = hierarchy.getAnnotationObjects().findAll { it.hasROI() && it.getROI().isArea() }
def byId = [:]
for (a in annotations)
    byId[a.getID().toString()] = a
def known = manifest.getAsJsonArray('annotations')
boolean same = known.size() == annotations.size()
for (k in known) {
    def a = byId[k.getAsJsonObject().get('id').getAsString()]
    double area = k.getAsJsonObject().get('area').getAsDouble()
    if (a == null || Math.abs(a.getROI().getArea() - area) > 1e-4 * Math.max(1.0, area))
        same = false
}
if (same) {
    def root = hierarchy.getRootObject()
    for (g in groups) {
        def parent = g[0] == null ? root : byId[g[0]]
        for (o in g[1])
            hierarchy.addObjectBelowParent(parent, o, false)
    }
    hierarchy.fireHierarchyChangedEvent(this)
} else {
    println "conic-qp: '${name}': the annotations differ from those conic-qp knew; QuPath places the detections itself (slower; export the regions and re-run annotate to avoid it)"
    def all = []
    for (g in groups)
        all.addAll(g[1])
    insertAll(hierarchy, all)
}

// 4. image type, save
if (imageData.getImageType() == ImageData.ImageType.UNSET)
    imageData.setImageType(ImageData.ImageType.BRIGHTFIELD_H_E)
entry.saveImageData(imageData)

println "conic-qp: '${name}': removed ${previous.size()} previous conic-qp detections, added ${nNew} from ${groups.size()} files"
for (a in hierarchy.getAnnotationObjects()) {
    def n = countDetections(a)
    println "conic-qp:   ${a.getName() ?: a.getPathClass() ?: 'annotation'} (${a.getID()}): ${n} detections"
}
