import Foundation
import Support

/// The one admission check of a disk image, run on every use: after a
/// download and before each build takes a file from the cache, whatever
/// the earlier uses of the same bytes declared.
///
/// Only `raw` and `qcow2` are accepted, and the bytes must agree with the
/// declared format: the file's header is read here, in Swift, before any
/// tool opens it, so a qcow2, VMDK, VHD or other format file declared
/// `raw` is refused without a format driver ever parsing it (a VMDK
/// descriptor names files that `qemu-img info` would open). A `qcow2` must
/// have no backing file and no external data file, in its header and in
/// `qemu-img info`'s answer. `qemu-img` runs as QEMU's own user (so it can
/// open nothing a guest could not) under CPU-time and memory limits.
enum ImageGate {
    /// How much CPU time and address space `qemu-img info` may take.
    static let cpuSeconds = 30
    static let addressSpaceBytes = 1 << 30

    /// Admits the file as a disk image of the declared format, or throws
    /// why not. Returns its virtual size in bytes, as `qemu-img info` read it.
    @discardableResult
    static func admit(_ path: String, declared format: String, what: String, qemuUser: String) async throws -> Int64 {
        guard ["raw", "qcow2"].contains(format) else {
            throw ImageError("\(what): disk_format must be qcow2 or raw (it is '\(format)')")
        }
        let found: DiskSignature?
        do {
            found = try DiskSignature.inspect(path)
        } catch {
            throw ImageError("\(what) cannot be read: \(error)")
        }
        switch (format, found) {
        case ("raw", nil):
            break
        case ("raw", let signature?):
            throw ImageError("\(what) is declared raw but its bytes are \(signature.name); declare its real format or convert it (qemu-img convert -O raw)")
        case ("qcow2", .qcow2(let header)?):
            if let problem = header.problem { throw ImageError("\(what) is refused: \(problem); upload a self-contained image (qemu-img convert)") }
        case ("qcow2", let signature):
            throw ImageError("\(what) is not a valid qcow2 image: its bytes are \(signature?.name ?? "not a disk image format, so raw")")
        default:
            throw ImageError("\(what): disk_format must be qcow2 or raw (it is '\(format)')")
        }
        return try await checkWithQemuImg(path, format: format, what: what, qemuUser: qemuUser)
    }

    /// Asks `qemu-img info -f FORMAT` (told the format, so it probes
    /// nothing) for a second opinion on what the header check passed.
    static func checkWithQemuImg(_ path: String, format: String, what: String, qemuUser: String) async throws -> Int64 {
        let result = try await runProgram(
            "prlimit",
            [
                "--cpu=\(cpuSeconds)", "--as=\(addressSpaceBytes)", "--",
                "setpriv", "--reuid=\(qemuUser)", "--regid=\(qemuUser)", "--clear-groups", "--no-new-privs", "--",
                "qemu-img", "info", "-f", format, "--output=json", path,
            ])
        guard result.status == 0 else {
            let reason = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            throw ImageError("\(what) is not a valid \(format) image: \(reason)")
        }
        guard let info = try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw ImageError("\(what): qemu-img info gave no readable answer")
        }
        guard info["format"] as? String == format else {
            throw ImageError("\(what) is \(info["format"] ?? "unknown"), not \(format)")
        }
        if let backing = info["backing-filename"] as? String {
            throw ImageError("\(what) is refused: it names a backing file (\(backing)); upload a self-contained image (qemu-img convert)")
        }
        if let specific = info["format-specific"] as? [String: Any], let data = specific["data"] as? [String: Any],
            let dataFile = data["data-file"] as? String
        {
            throw ImageError("\(what) is refused: it names an external data file (\(dataFile)); upload a self-contained image")
        }
        guard let virtualSize = (info["virtual-size"] as? NSNumber)?.int64Value, virtualSize > 0 else {
            throw ImageError("\(what): qemu-img info gave no virtual size")
        }
        return virtualSize
    }
}

/// What a disk image's own bytes say it is, by the signatures QEMU's
/// format drivers probe for.
enum DiskSignature: Equatable {
    case qcow2(QcowHeader)
    case other(String)

    var name: String {
        switch self {
        case .qcow2: "qcow2"
        case .other(let name): name
        }
    }

    /// The fields of a qcow2 header that decide whether the file stands alone.
    struct QcowHeader: Equatable {
        var version: UInt32
        var backingFileOffset: UInt64
        var incompatibleFeatures: UInt64

        var problem: String? {
            guard version == 2 || version == 3 else { return "its qcow2 version \(version) is not 2 or 3" }
            if backingFileOffset != 0 { return "its qcow2 header names a backing file" }
            if incompatibleFeatures & 0b100 != 0 { return "its qcow2 header names an external data file" }
            if incompatibleFeatures & 0b10 != 0 { return "its qcow2 header marks it corrupt" }
            return nil
        }
    }

    /// The signature found in the file at `path`, or nil for none (raw).
    static func inspect(_ path: String) throws -> DiskSignature? {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw ImageError("cannot open \(path)") }
        defer { try? handle.close() }
        let head = try handle.read(upToCount: 64 * 1024) ?? Data()
        let size = try handle.seekToEnd()
        var tail = Data()
        if size >= 512 {
            try handle.seek(toOffset: size - 512)
            tail = try handle.read(upToCount: 512) ?? Data()
        }
        return inspect(head: Array(head), tail: Array(tail))
    }

    static func inspect(head: [UInt8], tail: [UInt8]) -> DiskSignature? {
        func starts(_ bytes: [UInt8], _ text: String, at offset: Int = 0) -> Bool {
            let wanted = Array(text.utf8)
            return bytes.count >= offset + wanted.count && Array(bytes[offset..<offset + wanted.count]) == wanted
        }
        func bigEndian<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
            guard head.count >= offset + MemoryLayout<T>.size else { return 0 }
            return head[offset..<offset + MemoryLayout<T>.size].reduce(T(0)) { ($0 << 8) | T($1) }
        }
        if head.count >= 4, Array(head[0..<4]) == [0x51, 0x46, 0x49, 0xFB] {
            let version: UInt32 = bigEndian(UInt32.self, at: 4)
            if version == 1 { return .other("qcow (version 1)") }
            return .qcow2(
                QcowHeader(
                    version: version, backingFileOffset: bigEndian(UInt64.self, at: 8),
                    incompatibleFeatures: version >= 3 ? bigEndian(UInt64.self, at: 72) : 0))
        }
        let leading: [(String, String)] = [
            ("QED\u{0}", "QED"), ("KDMV", "VMDK"), ("COWD", "VMDK (ESX)"), ("vhdxfile", "VHDX"), ("conectix", "VHD"),
            ("WithoutFreeSpace", "Parallels"), ("WithouFreSpacExt", "Parallels"), ("Bochs Virtual HD Image", "Bochs"),
            ("#!/bin/sh\n#V2.0 Format", "cloop"),
        ]
        for (magic, name) in leading where starts(head, magic) { return .other(name) }
        if head.count >= 6, Array(head[0..<6]) == [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE] { return .other("LUKS") }
        // VDI: its magic, little-endian, at offset 0x40.
        if head.count >= 0x44, Array(head[0x40..<0x44]) == [0x7F, 0x10, 0xDA, 0xBE] { return .other("VDI") }
        // A VMDK descriptor is text naming its extents: files on the host.
        let text = String(decoding: head.prefix(4096), as: UTF8.self)
        if text.contains("# Disk DescriptorFile") || text.range(of: "createType", options: .caseInsensitive) != nil {
            return .other("a VMDK descriptor")
        }
        // Fixed VHD and DMG keep their signature in the last sector.
        if starts(tail, "conectix") { return .other("VHD (fixed)") }
        if starts(tail, "koly") { return .other("DMG") }
        return nil
    }
}
