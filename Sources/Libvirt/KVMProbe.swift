import Foundation

/// A 203-byte multiboot kernel that enters 64-bit long mode with paging, as
/// every x86-64 kernel does early, then writes `marker` to the first
/// serial port and halts: proof that guest code runs, and a yardstick of
/// how fast. Its source is `scripts/kvm-probe.S`; `scripts/kvm-probe-bytes`
/// prints the bytes below, and a test checks that they still agree.
enum KVMProbe {
    static let marker = "corral-kvm-probe-ok"
    static let namePrefix = "corral-kvm-probe-"

    static let hex = "02b0ad1b00000100fe4f51e40000100000001000000000000000000020001000fcbf00001100b9000c000031c0f3abc7050000110003101100c7050010110003201100c70500201100830000000f20e083c8200f22e0b8000011000f22d8b9800000c00f320d000100000f300f20c00d010000800f22c00f0115b0001000ea85001000080066baf803488d3526000000ac84c07403eeebf8f4ebfd0f1f440000000000000000000000000000009a20000f00a0001000636f7272616c2d6b766d2d70726f62652d6f6b0a00"

    static let kernel: [UInt8] = stride(from: 0, to: hex.utf8.count, by: 2).compactMap { offset in
        let start = hex.utf8.index(hex.utf8.startIndex, offsetBy: offset)
        let end = hex.utf8.index(start, offsetBy: 2)
        return UInt8(String(hex[start..<end]), radix: 16)
    }

    static func domainXML(name: String, virtType: String, kernel: String, console: String) -> String {
        """
        <domain type='\(virtType)'>
          <name>\(name)</name>
          <memory unit='MiB'>32</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64'>hvm</type>
            <kernel>\(escapeXMLAttribute(kernel))</kernel>
          </os>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>destroy</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            <serial type='file'>
              <source path='\(escapeXMLAttribute(console))'/>
              <target port='0'/>
            </serial>
          </devices>
        </domain>
        """
    }
}
