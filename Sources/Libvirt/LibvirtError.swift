import CLibvirt
import Foundation

/// An error reported by libvirt, or by the wrapper around it.
///
/// It carries libvirt's own error code, error domain (the subsystem that
/// failed) and message, plus the operation the wrapper was performing.
/// Match on ``code`` for the cases callers handle, for example
/// `catch let error as LibvirtError where error.code == .noDomain`.
public struct LibvirtError: Error, Sendable, Equatable, CustomStringConvertible {
    /// libvirt's error number (`virErrorNumber`).
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        init(_ number: virErrorNumber) { self.rawValue = Int32(number.rawValue) }

        /// The wrapper itself failed (no libvirt error was recorded).
        public static let wrapper = Code(rawValue: -1)
        /// No domain with the given name or UUID exists.
        public static let noDomain = Code(VIR_ERR_NO_DOMAIN)
        /// No storage pool with the given name or UUID exists.
        public static let noStoragePool = Code(VIR_ERR_NO_STORAGE_POOL)
        /// No storage volume with the given name, key or path exists.
        public static let noStorageVolume = Code(VIR_ERR_NO_STORAGE_VOL)
        /// The XML document is malformed.
        public static let xmlError = Code(VIR_ERR_XML_ERROR)
        /// The XML document is well formed but not what libvirt accepts.
        public static let xmlDetail = Code(VIR_ERR_XML_DETAIL)
        /// The operation is not valid in the object's current state
        /// (for example starting a running domain).
        public static let operationInvalid = Code(VIR_ERR_OPERATION_INVALID)
        /// The driver does not support the operation.
        public static let noSupport = Code(VIR_ERR_NO_SUPPORT)
        /// The driver does not support the operation with these arguments.
        public static let argumentUnsupported = Code(VIR_ERR_ARGUMENT_UNSUPPORTED)
        /// An argument was invalid.
        public static let invalidArgument = Code(VIR_ERR_INVALID_ARG)
        /// libvirt's generic "operation failed" (for example a name already in use).
        public static let operationFailed = Code(VIR_ERR_OPERATION_FAILED)
        /// The domain has no metadata under the requested namespace.
        public static let noDomainMetadata = Code(VIR_ERR_NO_DOMAIN_METADATA)
        /// No connection could be made, or the connection is gone.
        public static let noConnect = Code(VIR_ERR_NO_CONNECT)
        /// A system call failed (often: the daemon socket is missing).
        public static let systemError = Code(VIR_ERR_SYSTEM_ERROR)
        /// libvirt's internal error (also used for a closed client socket).
        public static let internalError = Code(VIR_ERR_INTERNAL_ERROR)
        /// The guest agent is not configured or not responding.
        public static let agentUnresponsive = Code(VIR_ERR_AGENT_UNRESPONSIVE)
        /// The operation timed out.
        public static let operationTimeout = Code(VIR_ERR_OPERATION_TIMEOUT)

        public var description: String { "\(rawValue)" }
    }

    /// What the wrapper was doing, e.g. `start domain 'web1'`.
    public var operation: String
    /// libvirt's error number.
    public var code: Code
    /// libvirt's error domain (`virErrorDomain`): the subsystem that failed.
    public var domain: Int32
    /// libvirt's message, or the wrapper's own.
    public var message: String

    public init(operation: String, code: Code, domain: Int32 = 0, message: String) {
        self.operation = operation
        self.code = code
        self.domain = domain
        self.message = message
    }

    public var description: String {
        "\(operation) failed: \(message)"
    }

    /// Reads libvirt's last error on the calling thread. Call it on the same
    /// thread as the failing call: libvirt keeps errors per thread.
    static func last(_ operation: String) -> LibvirtError {
        guard let error = virGetLastError() else {
            return LibvirtError(operation: operation, code: .wrapper, message: "libvirt reported a failure without an error message")
        }
        let message = error.pointee.message.map { String(cString: $0) } ?? "unknown libvirt error"
        return LibvirtError(
            operation: operation,
            code: Code(rawValue: error.pointee.code),
            domain: error.pointee.domain,
            message: message
        )
    }
}

/// Turns a libvirt return code into a thrown error (read on this thread).
@discardableResult
func check(_ result: Int32, _ operation: @autoclosure () -> String) throws -> Int32 {
    guard result >= 0 else { throw LibvirtError.last(operation()) }
    return result
}

/// Turns a libvirt pointer result into a thrown error when it is NULL.
func check<T>(_ pointer: T?, _ operation: @autoclosure () -> String) throws -> T {
    guard let pointer else { throw LibvirtError.last(operation()) }
    return pointer
}

/// Copies a libvirt-allocated C string into a Swift string and frees it.
func takeString(_ pointer: UnsafeMutablePointer<CChar>?) -> String? {
    guard let pointer else { return nil }
    defer { free(pointer) }
    return String(cString: pointer)
}
